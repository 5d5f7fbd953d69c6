"""The formats prepare reads, streaming: text, JSONL (plain, .gz, .zst), Parquet, Arrow IPC and
folders saved by Hugging Face ``datasets``; each file made here with the library that writes it."""

import gzip
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from helpers.corpus import random_text

from hvdllm.data import formats
from hvdllm.data.prepare import PrepareOptions, run_prepare
from hvdllm.data.sources import ReadStats, Skipped, read_documents, resolve_inputs
from hvdllm.errors import UserError

TEXTS = [f"document {i}: " + "word " * i for i in range(1, 8)]


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch):
    """Chunks and batches far smaller than the files, so that every reader crosses their edges."""
    monkeypatch.setattr(formats, "CHUNK_BYTES", 7)
    monkeypatch.setattr(formats, "ROWS_PER_BATCH", 3)


def jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write_arrow(path, table, file_format=False):
    """Arrow IPC: the stream format, as ``datasets``' save_to_disk writes it, or the file format."""
    new_writer = pa.ipc.new_file if file_format else pa.ipc.new_stream
    with pa.OSFile(str(path), "wb") as sink, new_writer(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)


def write_saved_dataset(folder, texts, shards):
    """A folder laid out as ``datasets.Dataset.save_to_disk`` lays it out (datasets 2.x-5.x):
    data-0000i-of-0000N.arrow in the IPC stream format, state.json listing them, dataset_info.json."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    per_shard = -(-len(texts) // shards)
    for i, name in enumerate(names):
        table = pa.table({"text": texts[i * per_shard:(i + 1) * per_shard]})
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": {
            "text": {"dtype": "string", "_type": "Value"}}}})})
        write_arrow(folder / name, table)
    state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": "0123456789abcdef",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"citation": "", "description": "", "features": {"text": {"dtype": "string", "_type": "Value"}},
            "homepage": "", "license": ""}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return [folder / name for name in names]


def read_all(path, index=0, **kw):
    stats = ReadStats()
    docs = list(read_documents(index, path, stats=stats, **kw))
    return docs, stats


def texts_and_keys(docs):
    return [d.text for d in docs], [d.key for d in docs]


# --- every format gives back its texts and keys, in order ----------------------------------------

def test_text_files_plain_and_zstd_are_one_document_each(tmp_path):
    text = "\n".join(TEXTS)
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    for name in ("a.txt", "a.txt.zst"):
        docs, stats = read_all(tmp_path / name, index=4)
        assert texts_and_keys(docs) == ([text], [(4, 0)])
        assert stats.bytes == (tmp_path / name).stat().st_size  # on disk: compressed for .zst


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz", "r.jsonl.zst", "r.jsonl.zst (two frames)"])
def test_jsonl_plain_gzip_and_zstd_keep_line_numbers(tmp_path, name):
    raw = jsonl_bytes({"text": t} for t in TEXTS[:3]) + b"\n" + jsonl_bytes({"text": t} for t in TEXTS[3:])
    path = tmp_path / name.split()[0]
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    elif "two frames" in name:  # as multi-threaded zstd and pzstd write it
        cut = len(raw) // 2
        path.write_bytes(zstandard.ZstdCompressor().compress(raw[:cut]) + zstandard.ZstdCompressor().compress(raw[cut:]))
    elif name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        path.write_bytes(raw)
    docs, stats = read_all(path, index=2)
    assert texts_and_keys(docs) == (TEXTS, [(2, n) for n in (1, 2, 3, 5, 6, 7, 8)])  # line 4 is blank
    assert stats.records == len(TEXTS) and stats.bytes == path.stat().st_size


def test_jsonl_with_bare_carriage_returns_numbers_lines_as_before(tmp_path):
    (tmp_path / "r.jsonl").write_bytes(b'{"text": "one"}\r{"text": "two"}\r\n\r\n{"text": "four"}\r')
    docs, _ = read_all(tmp_path / "r.jsonl")
    assert texts_and_keys(docs) == (["one", "two", "four"], [(0, 1), (0, 2), (0, 4)])


@pytest.mark.parametrize("kind", ["parquet", "arrow stream", "arrow file"])
def test_table_rows_are_records_numbered_from_one(tmp_path, kind):
    table = pa.table({"id": list(range(len(TEXTS))), "text": TEXTS})
    path = tmp_path / ("t.parquet" if kind == "parquet" else "t.arrow")
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=2)
    else:
        write_arrow(path, table, file_format=kind == "arrow file")
    docs, stats = read_all(path, index=1)
    assert texts_and_keys(docs) == (TEXTS, [(1, n) for n in range(1, len(TEXTS) + 1)])
    assert stats.records == len(TEXTS) and stats.bytes == path.stat().st_size


def test_a_record_file_streams_its_first_records_before_the_rest_is_read(tmp_path):
    """Records come as their lines are read: a file cut near its end yields its first records
    before the cut is found (a reader that held the whole file would fail at once)."""
    raw = jsonl_bytes({"text": random_text(random.Random(i), 40)} for i in range(200))
    whole = gzip.compress(raw)
    (tmp_path / "r.jsonl.gz").write_bytes(whole[:len(whole) * 3 // 4])
    docs = read_documents(0, tmp_path / "r.jsonl.gz")
    assert next(docs).key == (0, 1)
    with pytest.raises(UserError):
        list(docs)


# --- text fields: nested, prompt/completion, not text --------------------------------------------

def test_nested_text_field_in_jsonl_and_a_literal_dotted_key_wins(tmp_path):
    records = [{"meta": {"body": "nested one"}}, {"meta.body": "literal", "meta": {"body": "not this"}},
               {"meta": {"title": "no body"}}, {"meta": "a string, not an object"}]
    (tmp_path / "r.jsonl").write_bytes(jsonl_bytes(records))
    docs, stats = read_all(tmp_path / "r.jsonl", text_field="meta.body")
    assert texts_and_keys(docs) == (["nested one", "literal"], [(0, 1), (0, 2)])
    assert stats.missing_text == 2


@pytest.mark.parametrize("suffix", ["parquet", "arrow"])
def test_nested_text_field_in_a_struct_column(tmp_path, suffix):
    table = pa.table({"meta": [{"body": t, "lang": "en"} for t in TEXTS[:4]], "id": [1, 2, 3, 4]})
    path = tmp_path / f"t.{suffix}"
    pq.write_table(table, path) if suffix == "parquet" else write_arrow(path, table)
    docs, _ = read_all(path, text_field="meta.body")
    assert texts_and_keys(docs) == (TEXTS[:4], [(0, n) for n in (1, 2, 3, 4)])
    with pytest.raises(UserError, match=re.escape(f"{path}: no column 'meta.title' (columns: meta, id)")):
        read_all(path, text_field="meta.title")


def test_a_literal_dotted_column_wins_over_a_struct_path_in_parquet(tmp_path):
    table = pa.table({"meta": [{"body": "struct"}], "meta.body": ["literal"]})
    pq.write_table(table, tmp_path / "t.parquet")
    docs, _ = read_all(tmp_path / "t.parquet", text_field="meta.body")
    assert [d.text for d in docs] == ["literal"]


def test_prompt_and_completion_rows_of_parquet_are_prompt_masked(tmp_path):
    table = pa.table({"prompt": ["Q1? ", "Q2? ", "Q3? "], "completion": ["A1.", "", "A3."]})
    pq.write_table(table, tmp_path / "sft.parquet")
    docs, stats = read_all(tmp_path / "sft.parquet")  # no "text" column: not an error here
    assert [(d.key, d.text, d.prompt_chars) for d in docs] == [((0, 1), "Q1? A1.", 4), ((0, 3), "Q3? A3.", 4)]
    assert stats.missing_text == 1  # an empty completion falls back to the text field, which it lacks
    pq.write_table(table.append_column("text", pa.array(["t1", "t2", "t3"])), tmp_path / "mixed.parquet")
    docs, _ = read_all(tmp_path / "mixed.parquet")
    assert [(d.text, d.prompt_chars) for d in docs] == [("Q1? A1.", 4), ("t2", 0), ("Q3? A3.", 4)]


def test_a_column_that_is_not_text_is_counted_or_strict(tmp_path):
    pq.write_table(pa.table({"text": ["fine", None, "also fine"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    docs, stats = read_all(tmp_path / "a.parquet")
    assert [d.key for d in docs] == [(0, 1), (0, 3)]
    assert stats.not_text == 1 and stats.not_text_at == [f"{tmp_path / 'a.parquet'}:2 (null)"]
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'a.parquet'}:1: 'n' is a JSON number, not text")):
        read_all(tmp_path / "a.parquet", text_field="n", strict=True)


# --- bad input: one line naming the file ---------------------------------------------------------

@pytest.mark.parametrize("name,compress", [("r.jsonl.zst", zstandard.ZstdCompressor().compress),
                                           ("r.txt.zst", zstandard.ZstdCompressor().compress),
                                           ("r.jsonl.gz", gzip.compress), ("r.txt.gz", gzip.compress)])
def test_a_truncated_compressed_file_is_one_line_naming_it(tmp_path, name, compress):
    whole = compress(jsonl_bytes({"text": random_text(random.Random(i), 30)} for i in range(50)))
    path = tmp_path / name
    path.write_bytes(whole[:len(whole) // 2])
    kind = "zstd" if name.endswith(".zst") else "gzip"
    with pytest.raises(UserError, match=f"^{re.escape(f'{path}: truncated or corrupt {kind} file')}") as err:
        read_all(path)
    assert "\n" not in str(err.value)


def test_a_parquet_file_without_the_text_column_names_its_columns(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "t.parquet")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 't.parquet'}: no column 'text' (columns: body, id)")):
        read_all(tmp_path / "t.parquet")


@pytest.mark.parametrize("name,kind", [("t.parquet", "Parquet"), ("t.arrow", "Arrow IPC")])
def test_a_table_file_that_is_not_one_is_one_line(tmp_path, name, kind):
    (tmp_path / name).write_text("just text\n" * 20)
    with pytest.raises(UserError, match=f"^{re.escape(f'{tmp_path / name}: not a readable {kind} file: ')}"):
        read_all(tmp_path / name)


def test_a_file_gone_since_it_was_listed_is_one_line(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'gone.jsonl'}: cannot read: No such file")):
        read_all(tmp_path / "gone.jsonl")


# --- folders: Hugging Face datasets, compressed text ---------------------------------------------

def test_a_saved_dataset_folder_is_read_in_state_json_order(tmp_path):
    shards = write_saved_dataset(tmp_path / "ds", TEXTS, shards=3)
    files = resolve_inputs([str(tmp_path / "ds")])
    assert files == shards
    texts = [d.text for index, path in enumerate(files) for d in read_documents(index, path)]
    assert texts == TEXTS


def test_a_folder_with_a_saved_dataset_and_text_files(tmp_path):
    corpus = tmp_path / "corpus"
    shards = write_saved_dataset(corpus / "wiki" / "train", TEXTS, shards=2)
    (corpus / "notes.txt").write_text(TEXTS[0])
    (corpus / "z.txt.gz").write_bytes(gzip.compress(TEXTS[1].encode()))  # compressed text: judged by content
    (corpus / "a.tar.gz").write_bytes(gzip.compress(b"\0" * 512 + bytes(range(256))))
    numbers = [random.Random(0).getrandbits(60) for _ in range(100)]
    pq.write_table(pa.table({"n": numbers, "text": ["x"] * 100}), corpus / "t.parquet")  # binary, read by its suffix
    skipped = Skipped()
    files = resolve_inputs([str(corpus)], skipped)
    # The dataset's Arrow files, not its state.json and dataset_info.json
    assert files == sorted([corpus / "notes.txt", corpus / "t.parquet", corpus / "z.txt.gz", *shards])
    assert skipped.by_reason == {"binary": [corpus / "a.tar.gz"]}


def test_a_dataset_dict_folder_is_refused_naming_its_splits(tmp_path):
    write_saved_dataset(tmp_path / "dd" / "train", TEXTS, shards=1)
    write_saved_dataset(tmp_path / "dd" / "test", TEXTS[:2], shards=1)
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for named in (tmp_path / "dd", tmp_path):  # named, or found in a folder
        with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'dd'} is a Hugging Face DatasetDict "
                                                      f"(splits: train, test): name the folder of each split")):
            resolve_inputs([str(named)])
    assert resolve_inputs([str(tmp_path / "dd" / "test")]) == [tmp_path / "dd" / "test" / "data-00000-of-00001.arrow"]


def test_a_state_json_out_of_name_order_is_refused(tmp_path):
    write_saved_dataset(tmp_path / "ds", TEXTS, shards=2)
    state = json.loads((tmp_path / "ds" / "state.json").read_text())
    state["_data_files"].reverse()
    (tmp_path / "ds" / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'ds' / 'state.json'} lists its data files out of "
                                                  "name order")):
        resolve_inputs([str(tmp_path / "ds")])


# --- end to end ----------------------------------------------------------------------------------

def test_prepare_reads_jsonl_zst_and_parquet(tmp_path):
    rng = random.Random(5)
    texts = [random_text(rng, 60) for _ in range(12)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes({"text": t} for t in texts[:5])))
    pq.write_table(pa.table({"id": list(range(7)), "text": texts[5:]}), corpus / "b.parquet", row_group_size=3)
    opts = PrepareOptions(inputs=[str(corpus)], out=str(tmp_path / "out"), seq_len=16, tokenizer="byte",
                          val_fraction=0.0, near_dup_threshold=0.0)
    stats = run_prepare(opts)["stats"]
    assert stats["files"] == 2 and stats["records"] == 12 and stats["train_docs"] == 12
