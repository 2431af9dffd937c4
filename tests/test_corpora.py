"""Corpora as people download them: compressed JSON lines, Parquet, arXiv source packages and bulk tars, read as
streams with caps; exact duplicates dropped; every domain of a data/raw layout in one command."""

import bz2
import gzip
import io
import json
import lzma
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from scaletrain.data import sources
from scaletrain.data.prepare import prepare_domain
from scaletrain.data.text import InputError, ReadOptions, ReadStats, iter_documents

TEXTS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(300)]


def _jsonl(texts, key="text") -> bytes:
    return "".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def _zst(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _parquet(path, texts, key="text", row_group_size=64):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({key: texts, "id": list(range(len(texts)))}), path, row_group_size=row_group_size)


def _tokens(out, domain):
    m = json.loads((out / domain / "manifest.json").read_text())
    return m, b"".join((out / domain / s["file"]).read_bytes() for s in m["shards"])


def test_every_format_gives_the_tokens_of_plain_jsonl(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    plain = _jsonl(TEXTS)
    files = {"plain.jsonl": plain, "c4.json.gz": gzip.compress(plain), "slim.jsonl.zst": _zst(plain),
             "old.jsonl.bz2": bz2.compress(plain), "owt.jsonl.xz": lzma.compress(plain),
             "keyed.jsonl": _jsonl(TEXTS, "content")}
    for name, data in files.items():
        (raw / name).write_bytes(data)
    _parquet(raw / "fineweb.parquet", TEXTS)  # 5 row groups
    _parquet(raw / "keyed.parquet", TEXTS, key="content")
    out = tmp_path / "out"
    want_manifest, want = None, None
    for name in ["plain.jsonl", "c4.json.gz", "slim.jsonl.zst", "old.jsonl.bz2", "owt.jsonl.xz", "fineweb.parquet",
                 "keyed.jsonl", "keyed.parquet"]:
        domain = name.replace(".", "_")
        key = "content" if name.startswith("keyed") else "text"
        prepare_domain(domain, [str(raw / name)], str(out), quiet=True, opts=ReadOptions(text_key=key))
        m, got = _tokens(out, domain)
        if want is None:
            want_manifest, want = m, got
        assert got == want, name
        assert (m["documents"], m["tokens"]) == (want_manifest["documents"], want_manifest["tokens"]) == \
            (300, sum(len(t.encode()) + 1 for t in TEXTS))


def test_text_key_and_format_errors_name_the_place(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(["ok", "fine"]) + b'{"body": "x"}\n'))
    with pytest.raises(InputError, match=r"a.jsonl.gz:3: malformed JSONL line \(expected an object with a string "
                                         r"\"text\" field \(--text-key; this line has \['body'\]\)\)"):
        list(iter_documents([tmp_path / "a.jsonl.gz"]))
    _parquet(tmp_path / "p.parquet", ["x"])
    with pytest.raises(InputError, match=r"p.parquet: no column 'body' \(--text-key\); its columns are "
                                         r"\['text', 'id'\]"):
        list(iter_documents([tmp_path / "p.parquet"], opts=ReadOptions(text_key="body")))
    with pytest.raises(InputError, match=r"p.parquet: column 'id' holds int64, not text"):
        list(iter_documents([tmp_path / "p.parquet"], opts=ReadOptions(text_key="id")))
    (tmp_path / "array.json").write_text('\n[\n  {"text": "a"},\n  {"text": "b"}\n]\n')  # json.dump(rows, f, indent)
    with pytest.raises(InputError, match=r"array.json: one JSON array, not JSON lines \(an object a line\); convert "
                                         r"it, e.g. jq -c '.\[\]' .*array.json > array.jsonl"):
        list(iter_documents([tmp_path / "array.json"], skip_bad_lines=True))  # not 4 lines skipped as bad
    (tmp_path / "cut.jsonl.xz").write_bytes(lzma.compress(_jsonl(TEXTS))[:-200])
    with pytest.raises(InputError, match=r"cut.jsonl.xz: corrupt or truncated .xz data"):
        list(iter_documents([tmp_path / "cut.jsonl.xz"]))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(_jsonl(TEXTS))[:-200])  # truncated download
    with pytest.raises(InputError, match=r"cut.jsonl.gz: corrupt or truncated .gz data"):
        list(iter_documents([tmp_path / "cut.jsonl.gz"]))


def test_a_large_jsonl_is_cut_into_tasks_that_read_each_line_once(tmp_path, monkeypatch):
    """Byte ranges cut lines anywhere: each line belongs to the range its first byte is in, line numbers in
    messages stay right, and two workers write what one writes."""
    data = _jsonl(TEXTS)
    (tmp_path / "big.jsonl").write_bytes(data + b"not json\n")
    monkeypatch.setattr(sources, "TASK_BYTES", 997)  # a prime: cuts fall inside lines
    tasks = sources.tasks_for(tmp_path / "big.jsonl")
    assert len(tasks) == len(data) // 997 + 1
    stats = ReadStats()
    docs = [d.text for d in iter_documents([tmp_path / "big.jsonl"], skip_bad_lines=True, stats=stats)]
    assert docs == TEXTS and stats.bad_lines == 1
    with pytest.raises(InputError, match=r"big.jsonl:301: malformed JSONL line"):
        list(iter_documents([tmp_path / "big.jsonl"]))
    for name, workers in (("one", 1), ("two", 2)):
        prepare_domain(name, [str(tmp_path / "big.jsonl")], str(tmp_path / "out"), workers=workers, quiet=True,
                       skip_bad_lines=True)
    assert _tokens(tmp_path / "out", "one")[1] == _tokens(tmp_path / "out", "two")[1]


def test_workers_run_ahead_of_the_parent_through_the_spill_folder(tmp_path, monkeypatch):
    """While the parent is held on task 0, the other worker does not wait on a full queue: it tokenizes the next
    tasks and leaves what does not fit in memory on disk, no further than the lookahead allows. The pieces still
    come out in input order, and two workers write the shards one writes."""
    import time

    from scaletrain.data import encode
    from scaletrain.data.text import plan_tasks

    monkeypatch.setattr(encode, "PIECE_DOCS", 3)  # 30 documents a file: 10 pieces a task
    monkeypatch.setattr(encode, "QUEUE_PIECES", 1)
    monkeypatch.setattr(encode, "LOOKAHEAD_TASKS", 2)  # x 2 workers: tasks 0-4 while the parent is on 0
    files = []
    for k in range(10):
        files.append(tmp_path / f"part-{k}.jsonl.gz")
        files[-1].write_bytes(gzip.compress(_jsonl(TEXTS[30 * k: 30 * k + 30])))
    tasks = plan_tasks([str(f) for f in files], [])
    spec = encode.EncodeSpec(ReadOptions(), None, None, None, 0.0, "uint16")
    spill, spilled = tmp_path / "spill", encode.SpillStats()
    pieces = encode.encoded_pieces(tasks, spec, 2, ReadStats(), spill, spilled)
    got = [next(pieces)]  # the parent now holds task 0's first piece and waits
    counts, deadline = [], time.time() + 60
    while time.time() < deadline and (len(counts) < 20 or counts[-1] != counts[-20]):
        counts.append(len(list(spill.glob("*.npy"))))
        time.sleep(0.05)
    # tasks 0-4 are 50 pieces: the first is taken, each worker holds at most one in memory, the rest wait on disk;
    # blocking on a full queue would have left none on disk, no lookahead bound all 100 tasks' worth
    assert 45 <= counts[-1] <= 49, counts[-5:]
    got += list(pieces)
    assert not spill.exists() and spilled.pieces >= counts[-1] and spilled.bytes > 0
    one = list(encode.encoded_pieces(tasks, spec, 1, ReadStats(), spill))
    assert np.array_equal(np.concatenate([p.tokens for p in got]), np.concatenate([p.tokens for p in one]))
    assert np.array_equal(np.concatenate([p.hashes for p in got]), np.concatenate([p.hashes for p in one]))
    for name, workers in (("one", 1), ("two", 2)):
        prepare_domain(name, [str(f) for f in files], str(tmp_path / "out"), workers=workers, quiet=True)
    assert _tokens(tmp_path / "out", "one")[1] == _tokens(tmp_path / "out", "two")[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["one", "two"]  # no spill folder left behind


def test_a_full_disk_stops_prepare_with_a_message_and_keeps_the_previous_preparation(tmp_path, monkeypatch):
    """The disk fills while a shard is written (one worker) or while a worker leaves pieces on disk (two, every
    piece spilled): one clear error naming --output, the temporary folder gone, the previous domain intact."""
    import errno
    import os

    from scaletrain.data import encode, writer

    files = []
    for k in range(4):
        files.append(str(tmp_path / f"part-{k}.jsonl.gz"))
        Path(files[-1]).write_bytes(gzip.compress(_jsonl(TEXTS[75 * k: 75 * k + 75])))
    out = tmp_path / "out"
    prepare_domain("d", files, str(out), quiet=True)
    before = _tokens(out, "d")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / ".d.tmp-1" / "x"))

    monkeypatch.setattr(encode, "PIECE_DOCS", 5)
    for target, name, workers in ((writer.ShardWriter, "_write_chunk", 1), (encode, "_spill", 2)):
        with monkeypatch.context() as m:
            m.setattr(target, name, full)
            m.setattr(encode, "QUEUE_PIECES", 0)  # two workers: every piece goes to disk
            with pytest.raises(InputError, match=r"--output .*out: the disk is full \(No space left on device "
                                                 r"writing .*\) after .* GiB of d's shards; the previous .*/out/d "
                                                 r"is untouched\. Free space there or choose another --output"):
                prepare_domain("d", files, str(out), quiet=True, overwrite=True, workers=workers,
                               chunk_tokens=256, shard_tokens=1024)
        assert _tokens(out, "d") == before and sorted(p.name for p in out.iterdir()) == ["d"]


def test_documents_over_the_cap_are_skipped_and_counted(tmp_path):
    big = "x" * 5000
    (tmp_path / "a.jsonl.zst").write_bytes(_zst(_jsonl(["small", big, "after"])))
    (tmp_path / "b.txt").write_text(big)
    stats = ReadStats()
    docs = [d.text for d in iter_documents([tmp_path / "a.jsonl.zst", tmp_path / "b.txt"], stats=stats,
                                           opts=ReadOptions(max_document_bytes=1000))]
    assert docs == ["small", "after"] and stats.oversize == 2


def _tar(members: dict, links=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return buf.getvalue()


PAPER = (b"\\documentclass{article}\\newcommand{\\R}{\\mathbb{R}}\n\\begin{document}\n\\section{One}\n"
         b"Over $\\R$. \\input{body}\n\\end{document}\n")


def test_arxiv_packages_and_bulk_tars_are_read_as_streams(tmp_path):
    package = _tar({"main.tex": PAPER, "body.tex": b"The body.", "fig.png": b"\x89PNG\x00"})
    single = b"\\documentclass{article}\\begin{document}\\section{Two}Single file, caf\xe9.\\end{document}"
    bomb = gzip.compress(b"\\documentclass{article}" + b" " * 3_000_000)  # 3 MB from a few KB
    bulk = _tar({"2101/2101.00001.gz": gzip.compress(package), "2101/2101.00002.gz": gzip.compress(single),
                 "2101/2101.00003.gz": bomb, "2101/2101.00004.pdf": b"%PDF"},
                links=[("2101/evil.gz", tarfile.SYMTYPE, "/etc/passwd"), ("2101/hard.tex", tarfile.LNKTYPE, "x")])
    (tmp_path / "arXiv_src_2101_001.tar").write_bytes(bulk)
    (tmp_path / "2102.00005.gz").write_bytes(gzip.compress(package))  # one paper, as arXiv serves it
    (tmp_path / "2102.00006.tar.gz").write_bytes(gzip.compress(package))
    stats = ReadStats()
    docs = list(iter_documents([tmp_path], stats=stats, opts=ReadOptions(max_document_bytes=1 << 20)))
    paper = "\\section{One}\nOver $\\mathbb{R}$. The body."
    assert [(d.source.removeprefix(f"{tmp_path}/"), d.text) for d in docs] == [
        ("2102.00005.gz", paper), ("2102.00006.tar.gz", paper), ("arXiv_src_2101_001.tar:2101/2101.00001.gz", paper),
        ("arXiv_src_2101_001.tar:2101/2101.00002.gz", "\\section{Two}Single file, café.")]
    assert (stats.oversize, stats.link_members, stats.latex_latin1) == (1, 2, 1)
    text = list(iter_documents([tmp_path / "2102.00005.gz"], opts=ReadOptions(latex_style="text")))
    assert text[0].text == "One\n\nOver $\\mathbb{R}$. The body."


def test_exact_duplicates_and_empty_documents_are_dropped_and_recorded(tmp_path):
    texts = ["alpha", "beta", "alpha", "   ", "gamma", "beta", "alpha"]
    (tmp_path / "a.jsonl").write_bytes(_jsonl(texts))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(["gamma", "delta"])))  # across files too
    m = prepare_domain("d", [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")], str(tmp_path / "out"),
                       quiet=True, workers=2)
    assert m.train.documents == 4  # alpha beta gamma delta
    on_disk = json.loads((tmp_path / "out" / "d" / "manifest.json").read_text())
    assert on_disk["dropped"]["duplicates"] == 4 and on_disk["dropped"]["empty"] == 1
    assert on_disk["reading"]["text_key"] == "text" and on_disk["reading"]["latex_style"] == "source"
    kept = prepare_domain("all", [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")], str(tmp_path / "out"),
                          quiet=True, dedup=False)  # --no-dedup: a corpus deduplicated upstream
    assert kept.train.documents == 8 and kept.dropped["duplicates"] == 0 and kept.reading["dedup"] is False


def test_seen_hashes_matches_a_python_set():
    from scaletrain.data.encode import SeenHashes

    rng = np.random.default_rng(0)
    seen, ref = SeenHashes(capacity=16), set()
    for _ in range(50):  # grows from 16 slots; batches repeat values within and across
        batch = rng.integers(1, 3000, size=200).astype(np.uint64)  # (0 is stored as 1: a 2^-64 event)
        got = seen.add(batch)
        want = []
        for h in batch.tolist():
            want.append(h not in ref)
            ref.add(h)
        assert got.tolist() == want
    assert seen.n == len(ref)


def test_one_command_prepares_every_domain_of_a_raw_folder(tmp_path):
    raw = tmp_path / "data" / "raw"
    (raw / "arxiv").mkdir(parents=True)
    (raw / "general" / "web").mkdir(parents=True)
    (raw / "arxiv" / "2101.00001.gz").write_bytes(gzip.compress(_tar({"main.tex": PAPER, "body.tex": b"Body."})))
    (raw / "general" / "web" / "part-0.jsonl.gz").write_bytes(gzip.compress(_jsonl(TEXTS[:20])))
    out = tmp_path / "data" / "pretraining"
    r = subprocess.run([sys.executable, "-m", "scaletrain", "prepare", "--input", str(raw), "--output", str(out),
                        "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "arxiv: 1 documents" in r.stderr and "general: 20 documents" in r.stderr
    arxiv = json.loads((out / "arxiv" / "manifest.json").read_text())
    assert arxiv["documents"] == 1 and arxiv["reading"]["latex_style"] == "source"
    r = subprocess.run([sys.executable, "-m", "scaletrain", "prepare", "--input", str(raw / "general" / "web"),
                        "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no sub-folders to take as domains; pass --domain NAME" in r.stderr


def test_a_decompression_bomb_in_an_arxiv_package_keeps_memory_bounded(tmp_path):
    """512 MB of LaTeX from a 0.5 MB download, inside a bulk tar: skipped at the cap, counted, and the reading
    process never holds more than about the cap (its peak RSS is measured in a fresh process)."""
    bomb = gzip.compress(b"\\documentclass{article}" + b" " * (512 << 20), compresslevel=9)
    (tmp_path / "bulk.tar").write_bytes(_tar({"2101/2101.00001.gz": bomb,
                                               "2101/2101.00002.gz": gzip.compress(PAPER.replace(b"\\input{body}",
                                                                                                 b""))}))
    code = ("import sys, json; from scaletrain.data.text import iter_documents, ReadOptions, ReadStats; "
            "s = ReadStats(); d = list(iter_documents([sys.argv[1]], stats=s, "
            "opts=ReadOptions(max_document_bytes=16 << 20))); "
            "hwm = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0]; "
            "print(json.dumps([len(d), s.oversize, hwm // 1024]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bulk.tar")], capture_output=True, text=True,
                         timeout=120, check=True)
    docs, oversize, peak_mib = json.loads(out.stdout)
    assert (docs, oversize) == (1, 1)
    assert peak_mib < 150, peak_mib  # measured 48 MiB: the interpreter, imports and the 16 MB cap, not 512 MB


GOLDEN_HF = Path(__file__).parent / "golden" / "hf_datasets"  # written by the datasets library: see make.py there


def test_hugging_face_datasets_folders_are_read_as_saved(tmp_path):
    """A folder that `datasets`' save_to_disk wrote (its .arrow shards beside dataset_info.json and state.json)
    gives the documents of the rows it was made from; the metadata is listed as skipped, not read as JSON lines
    (which stopped prepare before), and a DatasetDict's folder, whose splits would all land in one domain, is
    refused naming the split's folder to give."""
    rows = [json.loads(line)["text"] for line in (GOLDEN_HF / "rows.jsonl").read_text().splitlines()]
    texts = [t for t in rows if t is not None]
    (tmp_path / "rows.jsonl").write_bytes(_jsonl(texts))
    out = tmp_path / "out"
    prepare_domain("hf", [str(GOLDEN_HF / "saved")], str(out), quiet=True)
    prepare_domain("plain", [str(tmp_path / "rows.jsonl")], str(out), quiet=True)
    manifest, tokens = _tokens(out, "hf")
    assert tokens == _tokens(out, "plain")[1]
    assert (manifest["documents"], manifest["dropped"]["empty"]) == (len(texts), 1)
    assert {Path(f).name: why for f, why in manifest["reading"]["skipped_files"]} == {
        name: "the datasets library's metadata of the .arrow files beside it"
        for name in ("dataset_info.json", "state.json")}
    with pytest.raises(InputError, match=r"saved_dict is a Hugging Face DatasetDict \(save_to_disk\) whose splits "
                                         r"are its sub-folders \(train, validation\): give the folder of the split "
                                         r"to train on, e.g. --input .*saved_dict/train"):
        list(iter_documents([GOLDEN_HF / "saved_dict"]))
    assert [d.text for d in iter_documents([GOLDEN_HF / "saved_dict" / "train"])] == [t for t in rows[:30] if t]


def test_arrow_files_are_cut_by_record_batches_in_either_ipc_format(tmp_path, monkeypatch):
    import pyarrow as pa

    table = pa.table({"content": TEXTS, "id": list(range(len(TEXTS)))})
    with pa.ipc.new_stream(tmp_path / "stream.arrow", table.schema) as w:  # what the datasets library writes
        w.write_table(table, max_chunksize=16)
    with pa.ipc.new_file(tmp_path / "file.arrow", table.schema) as w:  # Arrow's random-access format
        w.write_table(table, max_chunksize=16)
    monkeypatch.setattr(sources, "TASK_BYTES", 2000)
    opts = ReadOptions(text_key="content")
    for name in ("stream.arrow", "file.arrow"):
        tasks = sources.tasks_for(tmp_path / name)
        assert len(tasks) > 3 and tasks[0].start == 0 and tasks[-1].end == -(-len(TEXTS) // 16), name
        docs = list(iter_documents([tmp_path / name], opts=opts))
        assert [d.text for d in docs] == TEXTS and docs[17].source.endswith(f"{name}:row 18"), name
        for workers in (1, 2):
            prepare_domain(f"{name[:4]}{workers}", [str(tmp_path / name)], str(tmp_path / "out"), workers=workers,
                           quiet=True, opts=opts)
    (tmp_path / "rows.jsonl").write_bytes(_jsonl(TEXTS))
    prepare_domain("plain", [str(tmp_path / "rows.jsonl")], str(tmp_path / "out"), quiet=True)
    for domain in ("stre1", "stre2", "file1", "file2"):
        assert _tokens(tmp_path / "out", domain)[1] == _tokens(tmp_path / "out", "plain")[1], domain
    with pytest.raises(InputError, match=r"stream.arrow: no column 'text' \(--text-key\); its columns are "
                                         r"\['content', 'id'\]"):
        list(iter_documents([tmp_path / "stream.arrow"]))
    data = (tmp_path / "stream.arrow").read_bytes()
    (tmp_path / "cut.arrow").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(InputError, match=r"cut.arrow: corrupt or truncated arrow data"):
        list(iter_documents([tmp_path / "cut.arrow"], opts=opts))
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(InputError, match=r"junk.arrow: not a readable Arrow IPC file"):
        sources.tasks_for(tmp_path / "junk.arrow")


def test_evaluation_splits_found_in_a_folder_are_left_out_and_listed(tmp_path):
    """Downloaded corpora ship their evaluation splits beside the training one (SlimPajama's train/ validation/
    test/, the Pile's val.jsonl.zst, a snapshot's test-00000-of-00001.parquet, C4's c4-validation.*): a folder's
    walk used to read them all into the training domain. Named as inputs of their own they are read."""
    raw = tmp_path / "corpus"
    for path, texts in {"train/chunk1/a.jsonl.zst": TEXTS[:100], "validation/chunk1/a.jsonl.zst": TEXTS[100:150],
                        "test/chunk1/a.jsonl.zst": TEXTS[150:200], "val.jsonl.zst": TEXTS[200:220],
                        "en/c4-train.00000-of-00002.json.gz": TEXTS[220:260],
                        "en/c4-validation.00000-of-00001.json.gz": TEXTS[260:270],
                        "intervals_and_values.txt": None}.items():  # "val" inside a word is no split
        (raw / path).parent.mkdir(parents=True, exist_ok=True)
        data = _jsonl(texts) if texts else b"notes"
        (raw / path).write_bytes(_zst(data) if path.endswith(".zst") else gzip.compress(data) if
                                 path.endswith(".gz") else data)
    (raw / "hf").mkdir()
    _parquet(raw / "hf" / "train-00000-of-00001.parquet", TEXTS[270:290])
    for i in range(50):  # huggingface-cli download --local-dir leaves a file per download here: one line, not 50
        meta = raw / "hf" / ".cache" / "huggingface" / "download" / f"train-{i:05d}-of-00050.parquet.metadata"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text("etag")
    _parquet(raw / "hf" / "test-00000-of-00001.parquet", TEXTS[290:300])
    stats = ReadStats()
    docs = [d.text for d in iter_documents([raw], stats=stats)]
    assert sorted(docs) == sorted(TEXTS[:100] + TEXTS[220:260] + TEXTS[270:290] + ["notes"])
    left_out = {str(Path(f).relative_to(raw)): why for f, why in stats.skipped_files}
    assert set(left_out) == {"validation", "test", "val.jsonl.zst", "en/c4-validation.00000-of-00001.json.gz",
                             "hf/test-00000-of-00001.parquet", "hf/.cache"}
    assert left_out["hf/.cache"].startswith("a hidden folder: tools' own files")
    assert left_out["val.jsonl.zst"] == ("an evaluation split of the dataset by its name (val): held out, not "
                                         "trained on (give it as --val-input to validate on it, or as an --input of "
                                         "its own to train on it)")
    assert [d.text for d in iter_documents([raw / "val.jsonl.zst", raw / "validation"])] == TEXTS[200:220] + \
        TEXTS[100:150]
    with pytest.raises(InputError, match=r"folder .*only holds only evaluation splits \(.*only/test\), which a "
                                         r"folder's walk leaves out"):
        (tmp_path / "only" / "test").mkdir(parents=True)
        (tmp_path / "only" / "test" / "a.jsonl").write_bytes(_jsonl(TEXTS[:3]))
        list(iter_documents([tmp_path / "only"]))


def test_text_files_of_separated_documents_are_split_streamed_and_cut_into_tasks(tmp_path, monkeypatch):
    """TinyStories ships 2.2 GB of stories in one .txt, each ended by <|endoftext|>: as one document a file it was
    skipped whole as over the 1 GiB cap (or, the cap raised, trained as one document without an EOS between
    stories). --document-separator splits it, streamed, in byte-range tasks like JSON lines."""
    import random

    from scaletrain.data import reader

    rng = random.Random(0)
    stories = [f"Once upon a time, story {i}. " + "Lily went to the park. " * rng.randint(0, 30) for i in range(400)]
    stories[123] = "x" * 5000  # over the cap below: skipped and counted, its neighbours whole
    body = "".join(s + "\n<|endoftext|>\n" for s in stories)
    (tmp_path / "TinyStories-train.txt").write_text(body)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "stories.txt.gz").write_bytes(gzip.compress(body.encode()))
    want = [s.strip() for s in stories if len(s) < 4000]
    monkeypatch.setattr(reader, "_READ_BYTES", 61)  # separators and the cap fall across reads
    monkeypatch.setattr(sources, "TASK_BYTES", 997)  # and across task boundaries
    opts = ReadOptions(document_separator="<|endoftext|>", max_document_bytes=4000)
    for path in (tmp_path / "TinyStories-train.txt", tmp_path / "gz" / "stories.txt.gz"):
        stats = ReadStats()
        assert [d.text for d in iter_documents([path], opts=opts, stats=stats)] == want, path
        assert (stats.oversize, stats.empty) == (1, 0)  # blank pieces (the last newline) are no documents
    assert len(sources.tasks_for(tmp_path / "TinyStories-train.txt", separated=True)) == -(-len(body) // 997)
    with pytest.raises(InputError, match=r"hold no documents \(dropped: 1 over --max-document-bytes \(a .txt file "
                                         r"is one document unless --document-separator splits it"):
        prepare_domain("whole", [str(tmp_path / "TinyStories-train.txt")], str(tmp_path / "out"), quiet=True,
                       opts=ReadOptions(max_document_bytes=4000))
    for workers in (1, 2):
        prepare_domain(f"w{workers}", [str(tmp_path / "TinyStories-train.txt")], str(tmp_path / "out"),
                       workers=workers, quiet=True, opts=opts)
    m, tokens = _tokens(tmp_path / "out", "w1")
    assert tokens == _tokens(tmp_path / "out", "w2")[1]
    assert m["documents"] == len(want) and m["reading"]["document_separator"] == "<|endoftext|>"
    (tmp_path / "stories.jsonl").write_bytes(_jsonl(want))
    prepare_domain("plain", [str(tmp_path / "stories.jsonl")], str(tmp_path / "out"), quiet=True)
    assert tokens == _tokens(tmp_path / "out", "plain")[1]
    for data in (b"a||b|||c||", b"||", b"abc", b"", b"x|" * 40):  # what bytes.split gives, read by any size
        for cap in (3, 100):
            got = list(reader._pieces(io.BytesIO(data), b"||", 0, cap))
            parts = data.split(b"||")
            assert [p for _, p in got] == [p if len(p) <= cap else None for p in parts], (data, cap)
            assert [o for o, _ in got] == [sum(len(q) + 2 for q in parts[:k]) for k in range(len(parts))]


def test_document_separator_flag_reads_escapes(tmp_path):
    (tmp_path / "lines.txt").write_text("one\ntwo\n\nthree\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "scaletrain", "prepare", "--domain", "d", "--input",
                        str(tmp_path / "lines.txt"), "--output", str(out), "--document-separator", "\\n"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "d" / "manifest.json").read_text())
    assert (m["documents"], m["reading"]["document_separator"], m["dropped"]["empty"]) == (3, "\n", 0)


def test_a_datasets_own_validation_split_is_the_val_split_and_is_decontaminated(tmp_path):
    """--val-input: C4's c4-validation.* (which a folder's walk now leaves out) becomes the domain's val/, read
    first, and training documents equal to a validation one are dropped and counted, so val_loss does not measure
    memory. Split by worker count alike; refused beside --val-fraction."""
    raw = tmp_path / "c4" / "en"
    raw.mkdir(parents=True)
    train, valid = TEXTS[:250], TEXTS[250:]
    (raw / "c4-train.00000-of-00002.json.gz").write_bytes(gzip.compress(_jsonl(train[:120] + valid[:3])))
    (raw / "c4-train.00001-of-00002.json.gz").write_bytes(gzip.compress(_jsonl(train[120:])))
    (raw / "c4-validation.00000-of-00001.json.gz").write_bytes(gzip.compress(_jsonl(valid)))
    out = tmp_path / "out"
    (tmp_path / "held").mkdir()  # a folder of validation files: walked without leaving evaluation splits out
    (raw / "c4-validation.00000-of-00001.json.gz").rename(tmp_path / "held" / "c4-validation.00000-of-00001.json.gz")
    for workers in (1, 2):
        prepare_domain(f"c4_{workers}", [str(raw)], str(out), quiet=True, workers=workers,
                       val_inputs=[str(tmp_path / "held")])
    m = json.loads((out / "c4_1" / "manifest.json").read_text())
    assert (m["documents"], m["val"]["documents"]) == (len(train), len(valid))
    assert m["dropped"]["in_validation"] == 3 and m["dropped"]["duplicates"] == 0
    assert m["reading"]["val_inputs"] == [str(tmp_path / "held")]
    for sub, shards in (("", m["shards"]), ("val", m["val"]["shards"])):  # two workers write what one writes
        one, two = (b"".join((out / d / sub / s["file"]).read_bytes() for s in shards) for d in ("c4_1", "c4_2"))
        assert one == two, sub
    (tmp_path / "t.jsonl").write_bytes(_jsonl(train))
    (tmp_path / "v.jsonl").write_bytes(_jsonl(valid))
    prepare_domain("plain", [str(tmp_path / "t.jsonl")], str(out), quiet=True)
    prepare_domain("plain_val", [str(tmp_path / "v.jsonl")], str(out), quiet=True)
    assert _tokens(out, "c4_1")[1] == _tokens(out, "plain")[1]
    val_tokens = b"".join((out / "c4_1" / "val" / s["file"]).read_bytes() for s in m["val"]["shards"])
    assert val_tokens == _tokens(out, "plain_val")[1]
    with pytest.raises(InputError, match=r"--val-input and --val-fraction 0.1: the validation split comes from one "
                                         r"or the other"):
        prepare_domain("x", [str(raw)], str(out), quiet=True, val_fraction=0.1, val_inputs=[str(raw)])


def test_train_tokenizer_reads_the_corpus_as_prepare_does(tmp_path):
    """train-tokenizer read every file with the default options: a Parquet corpus with a `content` column (The
    Stack) could be prepared (--text-key content) but not trained on, and a TinyStories .txt was one document
    over the cap. It now takes prepare's reading options."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    pq.write_table(pa.table({"content": ["def add(a, b):\n    return a + b\n" * (i % 3 + 1) for i in range(60)]}),
                   tmp_path / "code.parquet")
    (tmp_path / "stories.txt").write_text("".join(f"Once upon a time, tale {i}.\n<|endoftext|>\n" for i in range(60)))

    def train(*args):
        return subprocess.run([sys.executable, "-m", "scaletrain", "train-tokenizer", "--vocab-size", "300",
                               "--output", str(tmp_path / "tok.json"), "--overwrite", *args], capture_output=True,
                              text=True)

    p = train("--input", str(tmp_path / "code.parquet"))
    assert p.returncode == 1 and "code.parquet: no column 'text' (--text-key); its columns are ['content']" in p.stderr
    p = train("--input", str(tmp_path / "code.parquet"), "--text-key", "content")
    assert p.returncode == 0, p.stderr
    assert "return" in {t.lstrip("Ġ") for t in Tokenizer.from_file(str(tmp_path / "tok.json")).get_vocab()}
    p = train("--input", str(tmp_path / "stories.txt"), "--document-separator", "<|endoftext|>",
              "--max-document-bytes", "100")  # each story is a document: under the cap
    assert p.returncode == 0, p.stderr
