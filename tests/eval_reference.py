"""Reference values of the evaluation metrics for tests/evaluation.rs: scikit-learn's
roc_auc_score, average_precision_score and the F1 maximum over precision_recall_curve; the pixel
F1 maximum over thresholds 0, 0.05, ..., 1.0 (score >= t); the MVTec AU-PRO (integration limit
0.3, 100 thresholds at equidistant positions of the sorted anomaly-free scores, connected
components with 8-connectivity, normalised by the limit); the image score (max of the 21x21
average pool, zero padding counted). Reads JSON on stdin, writes JSON on stdout."""
import json
import sys
from bisect import bisect

import numpy as np
from scipy.ndimage import label, uniform_filter
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

d = json.load(sys.stdin)
s = np.array(d["scores"], dtype=np.float32)
l = np.array(d["labels"], dtype=bool)
prec, rec, _ = precision_recall_curve(l, s)
with np.errstate(invalid="ignore", divide="ignore"):
    f1 = np.nan_to_num(2 * prec * rec / (prec + rec))
h, w = d["h"], d["w"]
maps = [np.array(m, dtype=np.float32).reshape(h, w) for m in d["maps"]]
gts = [np.array(g, dtype=bool).reshape(h, w) for g in d["gts"]]

px = np.concatenate([m.ravel() for m in maps])
pl = np.concatenate([g.ravel() for g in gts])
best = 0.0
for t in np.arange(0, 21) * 0.05:
    t = np.float32(t)
    pred = px >= t
    tp = float(np.sum(pred & pl))
    fp = float(np.sum(pred & ~pl))
    p = tp / (tp + fp) if tp + fp > 0 else 0.0
    r = tp / float(pl.sum())
    best = max(best, 2 * p * r / (p + r) if p + r > 0 else 0.0)

ok = []
comps = []
for m, g in zip(maps, gts):
    lab, n = label(g, np.ones((3, 3), dtype=int))
    ok.append(m[lab == 0])
    comps += [m[lab == k + 1] for k in range(n)]
ok = np.sort(np.concatenate(ok))
fprs, pros = [1.0], [1.0]
for pos in np.linspace(0, len(ok) - 1, num=100, dtype=int):
    thr = ok[pos]
    fprs.append(1.0 - (pos + 1) / len(ok))
    pros.append(float(np.mean([np.mean(c > thr) for c in comps])))
x, y = np.array(fprs[::-1]), np.array(pros[::-1])
limit = 0.3
corr = 0.0
if limit not in x:
    i = bisect(x, limit)
    yi = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
    corr = 0.5 * (yi + y[i - 1]) * (limit - x[i - 1])
keep = x <= limit
x, y = x[keep], y[keep]
aupro = (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + corr) / limit

pooled = [float((uniform_filter(m.astype(np.float64), size=21, mode="constant", cval=0.0)).max()) for m in maps]

json.dump(
    {
        "auroc": roc_auc_score(l, s),
        "ap": average_precision_score(l, s),
        "f1_max": float(f1.max()),
        "pixel_auroc": roc_auc_score(pl, px),
        "pixel_ap": average_precision_score(pl, px),
        "pixel_f1_max": best,
        "au_pro": float(aupro),
        "image_scores": pooled,
    },
    sys.stdout,
)
