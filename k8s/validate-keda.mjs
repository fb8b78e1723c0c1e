// Validates the KEDA objects that k8s/check.py extracted (JSON list of {where, object}) against
// the schemas of @kubernetes-models/keda. usage: node validate-keda.mjs KEDA_JSON
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(process.env.DEFECTFORGE_K8S_TOOLS + "/package.json");
const keda = require("@kubernetes-models/keda");
const items = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;
for (const { where, object } of items) {
  const [group, version] = object.apiVersion.split("/");
  const ctor = keda[version]?.[object.kind] ?? require(`@kubernetes-models/keda/${group}/${version}/${object.kind}`)[object.kind];
  if (!ctor) {
    console.log(`FAIL ${where}: no KEDA model for ${object.apiVersion} ${object.kind}`);
    failed++;
    continue;
  }
  try {
    new ctor(object).validate();
  } catch (e) {
    console.log(`FAIL ${where}: ${e.message}`);
    failed++;
  }
}
if (failed) process.exit(1);
console.log(`ok: ${items.length} KEDA objects valid`);
