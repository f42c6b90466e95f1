"""Parquet results: typed columns, batched parts, compaction to one row per trial."""
import pandas as pd
import pyarrow.parquet as pq

from sweep.results import ResultsWriter, compact, finished_trials, load, schema_for
from sweep.spec import expand, parse_spec

SPEC = {"name": "r", "dataset": {"name": "synthetic", "train_size": 1000}, "model": "small_cnn",
        "attacks": [{"name": "badnets", "target": [0, "all"]}, {"name": "none"}],
        "defenses": [{"name": "none"}, {"name": "finetune", "clean_size": [100, "one_shot"], "epochs": [1, 2]}]}


def rows(trials, status="ok"):
    for i, t in enumerate(trials):
        yield {"sweep": "r", "trial_id": t.trial_id, "attack": t.attack.name, "defense": t.defense.name,
               "seed": t.seed, "status": status, "clean_acc": 0.5, "asr": None if t.attack.name == "none" else 0.9,
               "finished_at": f"2026-01-01T00:00:{i:02d}",
               **{f"attack.{k}": v for k, v in t.attack.params.items()},
               **{f"defense.{k}": v for k, v in t.defense.params.items()}}


def test_schema_types():
    s = schema_for(expand(parse_spec(SPEC)))
    assert str(s.field("attack.target").type) == "string"  # 0 and 'all'
    assert str(s.field("attack.poison_rate").type) == "double"
    assert str(s.field("attack.patch_size").type) == "int64"
    assert str(s.field("defense.epochs").type) == "int64"
    assert str(s.field("defense.clean_size").type) == "string"  # 100 and 'one_shot'


def test_batches_then_one_compacted_file(tmp_path):
    trials = expand(parse_spec(SPEC))
    w = ResultsWriter(tmp_path, schema_for(trials), flush_rows=3)
    for r in rows(trials):
        w.add(r)
    assert len(list((tmp_path / "trials").glob("part-*.parquet"))) == len(trials) // 3
    w.close()
    files = list((tmp_path / "trials").glob("*.parquet"))
    assert len(files) == 1
    df = pd.read_parquet(tmp_path / "trials")
    assert len(df) == len(trials) == df.trial_id.nunique()
    assert str(pq.read_schema(files[0]).field("attack.patch_size").type) == "int64"
    typed = load(tmp_path)
    assert str(typed["attack.patch_size"].dtype) == "Int64" and str(typed["seed"].dtype) == "Int64"
    assert set(df["attack.target"].dropna()) == {"0", "all"}
    assert finished_trials(tmp_path) == {t.trial_id for t in trials}


def test_rerun_replaces_failed_rows(tmp_path):
    trials = expand(parse_spec(SPEC))
    w = ResultsWriter(tmp_path, schema_for(trials))
    for r in rows(trials, "failed"):
        w.add(r)
    w.close()
    assert finished_trials(tmp_path, include_failed=False) == set()
    w = ResultsWriter(tmp_path, schema_for(trials))
    for r in rows(trials[:2]):
        r["finished_at"] = "2027-" + r["finished_at"][5:]
        w.add(r)
    w.close()
    df = load(tmp_path)
    assert len(df) == len(trials)
    assert (df.set_index("trial_id").loc[[t.trial_id for t in trials[:2]], "status"] == "ok").all()
    assert len(pq.ParquetDataset(tmp_path / "trials").files) == 1


def test_compact_is_noop_for_one_file(tmp_path):
    trials = expand(parse_spec(SPEC))
    w = ResultsWriter(tmp_path, schema_for(trials))
    w.add(next(rows(trials)))
    w.close()
    before = list((tmp_path / "trials").glob("*.parquet"))
    compact(tmp_path)
    assert list((tmp_path / "trials").glob("*.parquet")) == before


def test_types_merge_across_runs(tmp_path):
    """A column mixed in one run (string) and pure int in the next is read back as one string column."""
    first = expand(parse_spec(SPEC))
    w = ResultsWriter(tmp_path, schema_for(first, tmp_path))
    for r in rows(first):
        w.add(r)
    w.close()
    spec2 = {**SPEC, "seeds": [7], "defenses": [{"name": "finetune", "clean_size": 100}],
             "attacks": [{"name": "badnets", "target": 1, "poison_rate": 0.2}]}
    second = expand(parse_spec(spec2))
    schema = schema_for(second, tmp_path)
    assert str(schema.field("defense.clean_size").type) == "string"
    w = ResultsWriter(tmp_path, schema)
    for r in rows(second):
        w.add(r)
    w.flush()
    df = load(tmp_path)  # two parts, merged on read
    assert len(df) == len(first) + len(second)
    assert set(df["defense.clean_size"].dropna()) == {"100", "one_shot"}
    w.close()
    assert len(pd.read_parquet(tmp_path / "trials")) == len(first) + len(second)
