"""What a data scientist does with a finalized manifest: open it from S3 with pyarrow, query it
with DuckDB, and join every row back to its objects (size and sha256).
Usage: check_manifest.py <endpoint> <region> <bucket> <key prefix of campaign> <expected rows>
Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
import hashlib, os, sys
import duckdb
import pyarrow.fs as pafs
import pyarrow.parquet as pq

endpoint, region, bucket, prefix, expected = sys.argv[1:6]
host = endpoint.split("://", 1)[1]
fs = pafs.S3FileSystem(endpoint_override=host, scheme="http", region=region,
                       access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])
parts = [f.path for f in fs.get_file_info(pafs.FileSelector(f"{bucket}/{prefix}/manifest/"))
         if f.path.endswith(".parquet")]
assert parts, "no manifest parts"
table = pq.read_table(parts, filesystem=fs)
assert table.num_rows == int(expected), (table.num_rows, expected)
meta = pq.ParquetFile(parts[0], filesystem=fs).metadata.metadata
assert meta[b"defectforge.manifest_version"] == b"3", meta
con = duckdb.connect()
con.register("m", table)
dup = con.execute("select count(*) - count(distinct sample_id) from m").fetchone()[0]
assert dup == 0, f"{dup} duplicate sample ids"
by_type = con.execute("select category, defect_type, count(*) from m group by 1, 2 order by 1, 2").fetchall()
print("rows per type:", by_type)
outside = con.execute("select max(mean_abs_change_outside) from m").fetchone()[0]
assert outside == 0, outside
# model-free generators keep the background exactly: PSNR is infinite, sizes are the normal's
psnr = con.execute("select min(background_psnr) from m").fetchone()[0]
assert psnr == float("inf"), psnr
resized = con.execute("select count(*) from m where width != normal_width or height != normal_height").fetchone()[0]
assert resized == 0, resized
for row in table.select(["image_uri", "image_size", "image_sha256", "mask_uri", "mask_size", "mask_sha256"]).to_pylist():
    for kind in ("image", "mask"):
        path = row[f"{kind}_uri"].removeprefix("s3://")
        with fs.open_input_file(path) as f:
            data = f.read()
        assert len(data) == row[f"{kind}_size"], path
        assert hashlib.sha256(data).hexdigest() == row[f"{kind}_sha256"], path
print(f"ok: {table.num_rows} rows joined to their objects")
