"""The naive baseline of bench_shard: one process, load the JSON, loop over the records, read and
decode each record's image, write the same tables. Usage: naive_shard.py MIXTURE IMAGE_ROOT OUT"""

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines.shard.stage import IMAGE_SCHEMA, REJECT_SCHEMA, SAMPLE_SCHEMA, check_record, infer_source  # noqa: E402


def main(mixture: str, image_root: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    records = json.load(open(mixture))
    samples, rejects, images = [], [], {}
    for index, record in enumerate(records):
        problem = check_record(index, record)
        if problem:
            rejects.append(vars(problem))
            continue
        key = None
        if record.get("image"):
            try:
                data = Path(image_root, record["image"]).read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
                    size = image.size
            except Exception as err:
                rejects.append({"index": index, "id": str(record["id"]), "reason": "bad image", "detail": str(err)})
                continue
            key = hashlib.sha256(data).hexdigest()
            images.setdefault(key, {"image_key": key, "bytes": data, "width": size[0], "height": size[1]})
        samples.append({"index": index, "id": str(record["id"]), "source": infer_source(record),
                        "image_path": record.get("image"), "image_key": key,
                        "conversations": json.dumps(record["conversations"])})
    pq.write_table(pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA), f"{out}/samples.parquet", compression="zstd")
    pq.write_table(pa.Table.from_pylist(list(images.values()), schema=IMAGE_SCHEMA), f"{out}/images.parquet")
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), f"{out}/rejects.parquet")
    print(f"naive: {len(samples)} samples, {len(images)} images, {len(rejects)} rejects")


if __name__ == "__main__":
    main(*sys.argv[1:4])
