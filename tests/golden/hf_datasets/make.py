"""How the folders here were made: by the datasets library itself (5.2.0), as a user's `load_dataset(...)` then
`save_to_disk(...)` leaves them. Run with a Python that has `datasets`: python make.py (in this folder)."""
import json
import shutil

import datasets

rows = [{"text": f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 5 + 1), "id": i}
        for i in range(40)]
rows[7]["text"] = None  # a missing text, as real datasets have
with open("rows.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
for name in ("saved", "saved_dict"):
    shutil.rmtree(name, ignore_errors=True)
d = datasets.Dataset.from_list(rows)
d.save_to_disk("saved", num_shards=2)
datasets.DatasetDict({"train": d.select(range(30)), "validation": d.select(range(30, 40))}).save_to_disk("saved_dict")
