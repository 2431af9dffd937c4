"""Input text that used to lose data silently: line separators inside JSONL lines, files a folder walk skipped,
byte-order marks, binary files, files that vanish."""

import json
import os

import pytest

from scaletrain.data.text import InputError, ReadStats, iter_documents


def _docs(paths, **kw):
    stats = ReadStats()
    return [d.text for d in iter_documents([str(p) for p in paths], stats=stats, **kw)], stats


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029, U+0085, \\x0b and \\x0c raw: they are text, not line
    ends, and later line numbers stay right."""
    texts = ["a\u2028b", "c\u2029d", "e\u0085f", "g\x0bh", "i\x0cj", "crlf"]
    f = tmp_path / "web.jsonl"
    f.write_bytes(("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts[:-1])
                   + json.dumps({"text": texts[-1]}) + "\r\n" + '{"text": broken}\n').encode())
    with pytest.raises(InputError, match=r"web.jsonl:7: malformed JSONL line"):
        _docs([f])
    docs, stats = _docs([f], skip_bad_lines=True)
    assert docs == texts and stats.bad_lines == 1


def test_every_file_in_a_folder_is_read_or_reported(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "A.JSONL").write_text('{"text": "upper case suffix"}\n')
    (root / "b.json").write_text('{"text": "json lines"}\n')
    (root / "notes.pdf").write_bytes(b"%PDF")
    (root / "sub" / "c.txt").write_text("in a sub-folder")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "d.txt").write_text("behind a symlinked folder")
    os.symlink(outside, root / "linked")
    os.symlink(root, root / "sub" / "loop")  # a link back up: read once, reported, no endless walk
    docs, stats = _docs([root])
    assert sorted(docs) == sorted(["upper case suffix", "json lines", "behind a symlinked folder", "in a sub-folder"])
    skipped = dict(stats.skipped_files)
    assert skipped[str(root / "notes.pdf")].startswith(
        "not a .jsonl/.json/.txt/.tex (optionally .gz/.zst/.bz2/.xz), .parquet, .arrow")
    assert "already read" in skipped[str(root / "sub" / "loop")]


def test_bom_binary_and_vanishing_files(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfstarts with a BOM")
    jsonl_bom = tmp_path / "bom.jsonl"
    jsonl_bom.write_bytes(b'\xef\xbb\xbf{"text": "json with a BOM"}\n')
    assert _docs([bom, jsonl_bom])[0] == ["starts with a BOM", "json with a BOM"]
    binary = tmp_path / "zeros.txt"
    binary.write_bytes(bytes(64))
    with pytest.raises(InputError, match=r"zeros.txt: binary data \(a NUL byte at offset 0\), not text"):
        _docs([binary])
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    (folder / "gone.jsonl").write_text('{"text": "x"}\n')
    docs = iter_documents([str(folder)])
    assert next(docs).text == "first"
    (folder / "gone.jsonl").unlink()  # listed, then deleted before it is read
    with pytest.raises(InputError, match=r"gone.jsonl: cannot read \(No such file or directory\); was it moved"):
        list(docs)


def test_prepare_uses_the_workers_it_is_given_and_writes_the_same_shards(tmp_path, capsys):
    """--workers used to be ignored (silently, then with a note) for the byte-level tokenizer; reading, LaTeX cleaning
    and decompression now run on the workers too, so the flag is honoured and the output does not depend on it."""
    from scaletrain.data.prepare import prepare_domain

    (tmp_path / "in").mkdir()
    for i in range(5):
        (tmp_path / "in" / f"{i}.txt").write_text(f"some text {i}")
    for name, workers in (("one", 1), ("four", 4)):
        prepare_domain(name, [str(tmp_path / "in")], str(tmp_path / "out"), workers=workers)
    assert "not used" not in capsys.readouterr().err
    one, four = tmp_path / "out" / "one", tmp_path / "out" / "four"
    assert (one / "shard-00000.tar").read_bytes() == (four / "shard-00000.tar").read_bytes()


@pytest.mark.parametrize("domain", ["../web", "a/b", ".web", "", "web ", "we\tb"])
def test_a_domain_name_is_a_plain_folder_name(tmp_path, domain):
    """The domain is a folder under --output and a name --data-sources repeats: one ending in a space was prepared
    (as 'web /'), then named by no --data-sources a user would type."""
    from scaletrain.data.prepare import prepare_domain

    (tmp_path / "in.jsonl").write_text('{"text": "a document"}\n')
    with pytest.raises(InputError, match="use a plain folder name such as 'arxiv'"):
        prepare_domain(domain, [str(tmp_path / "in.jsonl")], str(tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
