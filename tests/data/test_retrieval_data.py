"""Retrieval data: the per-user time split (data/retrieval.py), the item catalog
(data/catalog.py), the synthetic two-tower generator (data/synth.py) and the MovieLens
retrieval conversion (data/movielens.py, `rectrain data movielens --task retrieval`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from data.catalog import ItemCatalog
from data.retrieval import Feature, items_table, split_interactions, write_retrieval
from data.schema import DataError
from data.synth import synthesize_two_tower, write_two_tower
from tests.conftest import MOVIELENS


def _split(user, item, ts, pos, **kw):
    kw.setdefault("num_users", max(user) + 2)
    kw.setdefault("num_items", max(item) + 1)
    return split_interactions(np.array(user), np.array(item), np.array(ts), np.array(pos, bool), **kw)


# --------------------------------------------------------------------------- the split


def test_hand_made_split():
    # user 0: positives 1,2,4,5 then a re-rated 1 (held out, already seen: left out); 3 is not positive
    # user 1: two positives at the same second: item order breaks the tie, 2 is held out
    # user 2: no positive: no rows; user 3 does not occur
    s = _split(user=[0, 0, 0, 0, 0, 1, 1, 2, 0], item=[1, 2, 3, 4, 5, 2, 1, 3, 1],
               ts=[1, 2, 3, 4, 5, 1, 1, 1, 6], pos=[1, 1, 0, 1, 1, 1, 1, 0, 1], max_history=2)
    assert s.train.to_pydict() == {
        "user_id": [0, 1, 0, 0, 0],
        "history": [[], [], [1], [1, 2], [2, 4]],
        "item_id": [1, 1, 2, 4, 5],
        "timestamp": [1, 1, 2, 4, 5],
    }
    assert s.eval.to_pydict() == {"user_id": [1], "history": [[1]], "targets": [[2]], "seen": [[1]]}
    assert s.counts["skipped"] == {"held_out_repeats": 0, "held_out_already_seen": 1, "users_with_no_new_target": 1}
    assert s.counts["users_without_positives"] == 1 and s.counts["positives"] == 7


def test_seen_holds_the_whole_training_period_and_history_only_positives():
    # positives 10, 11, 12, 13, 14 (one held out: 14); 20 (not positive, before 14) is seen;
    # 21 (not positive, after the first held-out positive) is neither seen nor a target
    s = _split(user=[0] * 7, item=[10, 20, 11, 12, 13, 14, 21], ts=[1, 2, 3, 4, 5, 6, 7],
               pos=[1, 0, 1, 1, 1, 1, 0], max_history=3)
    e = s.eval.to_pydict()
    assert e["history"] == [[11, 12, 13]] and e["targets"] == [[14]] and e["seen"] == [[10, 11, 12, 13, 20]]
    assert s.train.column("history").to_pylist()[-1] == [10, 11, 12]


@pytest.mark.parametrize("n", range(1, 13))
def test_twenty_percent_rule(n):
    s = _split(user=[0] * n, item=list(range(n)), ts=list(range(n)), pos=[1] * n)
    held = min(math.ceil(0.2 * n - 1e-9), n - 1)
    assert s.train.num_rows == n - held
    assert s.eval.column("targets").to_pylist() == ([list(range(n - held, n))] if held else [])


def _random_log(seed: int, users: int = 40, items: int = 60, n: int = 1500):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, users, n), rng.integers(0, items, n), rng.integers(0, 50, n),  # many tied times
            rng.random(n) < 0.6)


def test_no_leakage_and_caps_on_random_logs():
    user, item, ts, pos = _random_log(0)
    H = 5
    s = split_interactions(user, item, ts, pos, num_users=40, num_items=60, max_history=H)
    # the reference: (timestamp, item, user, input position) order, per user
    order = np.lexsort((np.arange(len(user)), user, item, ts))
    train = s.train.to_pydict()
    last_train_time, train_items = {}, {}
    by_user_rows: dict[int, list[int]] = {}
    for r, u in enumerate(train["user_id"]):
        by_user_rows.setdefault(u, []).append(r)
    for u, rows in by_user_rows.items():
        events = [i for i in order if user[i] == u]
        positives = [int(item[i]) for i in events if pos[i]]
        got = [train["item_id"][r] for r in rows]
        assert got == positives[: len(got)]  # the earliest positives are the training ones
        for k, r in enumerate(rows):
            assert train["history"][r] == positives[max(0, k - H):k]  # earlier positives only, capped
        last_train_time[u] = max(train["timestamp"][r] for r in rows)
        cut = [j for j, i in enumerate(events) if pos[i]][len(rows)] if len(rows) < len(positives) else len(events)
        train_items[u] = {int(item[i]) for i in events[:cut]}
    assert train["timestamp"] == sorted(train["timestamp"])  # rows in time order
    ev = s.eval.to_pydict()
    assert ev["user_id"] == sorted(ev["user_id"]) and len(ev["user_id"]) > 20
    for u, hist, targets, seen in zip(ev["user_id"], ev["history"], ev["targets"], ev["seen"]):
        assert seen == sorted(train_items[u])
        assert not set(targets) & set(seen) and len(set(targets)) == len(targets) and targets
        rows = by_user_rows[u]
        assert hist == [train["item_id"][r] for r in rows][-H:]
        held = [i for i in order if user[i] == u and pos[i]][len(rows):]
        assert all(ts[i] >= last_train_time[u] for i in held)
        assert set(targets) <= {int(item[i]) for i in held}
    # the 20% rule on every user with positives
    for u in range(40):
        n = int(pos[user == u].sum())
        if n:
            assert len(by_user_rows[u]) == n - min(math.ceil(0.2 * n - 1e-9), n - 1)


def test_split_does_not_depend_on_input_order():
    user, item, ts, pos = _random_log(1)
    a = split_interactions(user, item, ts, pos, num_users=40, num_items=60)
    p = np.random.default_rng(2).permutation(len(user))
    b = split_interactions(user[p], item[p], ts[p], pos[p], num_users=40, num_items=60)
    assert a.train.equals(b.train) and a.eval.equals(b.eval)


def test_features_are_gathered_per_row_and_bad_ids_refused():
    genres = Feature(5, np.array([0, 1, 2, 3], np.int64), np.array([0, 2, 2, 4], np.int64))  # 3 items
    s = _split(user=[0, 0, 0], item=[0, 1, 2], ts=[1, 2, 3], pos=[1, 1, 1], num_items=3,
               item_features={"genres": genres}, user_features={"age": Feature(9, np.array([7, 8]))})
    t = s.train.to_pydict()
    assert list(t) == ["user_id", "age", "history", "item_id", "genres", "timestamp"]
    assert t["genres"] == [[0, 1], []] and t["age"] == [7, 7]
    assert s.eval.column_names == ["user_id", "age", "history", "targets", "seen"]
    with pytest.raises(DataError, match=r"item ids must lie in \[0, 3\)"):
        _split(user=[0], item=[3], ts=[1], pos=[1], num_items=3)
    with pytest.raises(DataError, match="--test-fraction"):
        _split(user=[0], item=[0], ts=[1], pos=[1], test_fraction=1.0)


def test_history_features_follow_the_history():
    genres = Feature(5, np.array([0, 1, 2, 3], np.int64), np.array([0, 2, 2, 4], np.int64))  # 3 items
    year = Feature(9, np.array([5, 6, 7], np.int64))
    s = _split(user=[0, 0, 0, 0, 0, 0], item=[2, 0, 2, 0, 2, 1], ts=[1, 2, 3, 4, 5, 6], pos=[1, 1, 0, 1, 1, 1],
               num_items=3, item_features={"genres": genres, "year": year}, history_features=["genres", "year"])
    t = s.train.to_pydict()  # positives 2, 0, 0, 2 | held out: 1
    assert t["history"] == [[], [2], [2, 0], [2, 0, 0]]
    assert t["history_genres"] == [[], [2, 3], [2, 3, 0, 1], [2, 3, 0, 1, 0, 1]]
    assert t["history_year"] == [[], [7], [7, 5], [7, 5, 5]]
    e = s.eval.to_pydict()
    assert e["history"] == [[2, 0, 0, 2]] and e["targets"] == [[1]]
    assert e["history_genres"] == [[2, 3, 0, 1, 0, 1, 2, 3]] and e["history_year"] == [[7, 5, 5, 7]]
    capped = _split(user=[0] * 4, item=[2, 0, 1, 2], ts=[1, 2, 3, 4], pos=[1] * 4, num_items=3, max_history=2,
                    item_features={"genres": genres}, history_features=["genres"]).train.to_pydict()
    assert capped["history"][-1] == [2, 0] and capped["history_genres"][-1] == [2, 3, 0, 1]
    with pytest.raises(DataError, match="history features"):
        _split(user=[0], item=[0], ts=[1], pos=[1], item_features={"genres": genres}, history_features=["nope"])


def test_write_retrieval_layout_and_meta(tmp_path):
    genres = Feature(4, np.array([0, 1, 2, 3], np.int64), np.array([0, 2, 2, 3, 4], np.int64))
    s = _split(user=[0, 0, 0, 1, 1], item=[0, 1, 2, 3, 1], ts=[1, 2, 3, 4, 5], pos=[1] * 5, num_items=4,
               item_features={"genres": genres})
    items = items_table(4, {"genres": genres}, np.array([10, 20, 30, 40]), ["a", "b", None, "d"])
    meta = write_retrieval(tmp_path, s, items)
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk["num_items"] == 4 and on_disk["vocab_sizes"] == {"user_id": 3, "item_id": 4, "history": 4,
                                                                   "genres": 4}
    assert on_disk["query_features"] == ["user_id", "history"]
    assert on_disk["candidate_features"] == ["item_id", "genres"] and on_disk["title_column"] == "title"
    assert meta["paths"]["train"].endswith("train/part-00000.parquet")
    types = {name: {f.name: str(f.type) for f in pq.read_schema(tmp_path / name / "part-00000.parquet")}
             for name in ("train", "eval", "items")}
    assert types["train"] == {"user_id": "int64", "history": "list<element: int64>", "item_id": "int64",
                              "genres": "list<element: int64>", "timestamp": "int64"}
    assert types["eval"] == {"user_id": "int64", "history": "list<element: int64>",
                             "targets": "list<element: int64>", "seen": "list<element: int64>"}
    assert types["items"] == {"item_id": "int64", "genres": "list<element: int64>", "title": "string",
                              "raw_id": "int64"}


# --------------------------------------------------------------------------- the catalog


def _catalog_file(path, ids, genres, cat, titles=True):
    cols = {"item_id": pa.array(ids, pa.int64()), "genres": pa.array(genres, pa.list_(pa.int64())),
            "category": pa.array(cat, pa.int64())}
    if titles:
        cols["title"] = pa.array([f"t{i}" for i in ids])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)


def test_catalog_reads_sorted_csr_and_cuts_rows(tmp_path):
    _catalog_file(tmp_path / "items" / "a.parquet", [2, 0], [[5, 6], None], [1, None])
    _catalog_file(tmp_path / "items" / "b.parquet", [1, 3], [[7, None, 8], []], [2, 3])
    cat = ItemCatalog.read(str(tmp_path / "items"), ["item_id", "genres", "category"])
    assert cat.item_ids.tolist() == [0, 1, 2, 3] and len(cat) == 4
    assert cat.titles == ["t0", "t1", "t2", "t3"]
    values, offsets = cat.features["genres"]
    assert values.tolist() == [7, 8, 5, 6] and offsets.tolist() == [0, 0, 2, 4, 4]  # nulls dropped
    got = cat.kjt_rows(torch.tensor([2, 1, 2, 0, 3]))
    assert got["genres"][0].tolist() == [5, 6, 7, 8, 5, 6] and got["genres"][1].tolist() == [2, 2, 2, 0, 0]
    assert got["category"][0].tolist() == [1, 2, 1, 3] and got["category"][1].tolist() == [1, 1, 1, 0, 1]
    assert got["item_id"][0].tolist() == [2, 1, 2, 0, 3]
    empty = cat.kjt_rows(torch.zeros(0, dtype=torch.int64), ["genres"])
    assert empty["genres"][0].numel() == 0 and empty["genres"][1].numel() == 0
    assert cat.rows_for(torch.tensor([3, 9, 0])).tolist() == [3, -1, 0]
    if torch.cuda.is_available():
        on_gpu = cat.to("cuda").kjt_rows(torch.tensor([2, 1], device="cuda"))
        assert on_gpu["genres"][0].cpu().tolist() == [5, 6, 7, 8]


def test_catalog_errors_name_the_file(tmp_path):
    _catalog_file(tmp_path / "dup.parquet", [0, 1, 1], [[], [], []], [0, 0, 0])
    with pytest.raises(DataError, match=r"dup\.parquet: item id 1 appears 2 times"):
        ItemCatalog.read(str(tmp_path / "dup.parquet"), ["genres"])
    _catalog_file(tmp_path / "ok.parquet", [0, 1], [[], []], [0, 0], titles=False)
    with pytest.raises(DataError, match=r"ok\.parquet: the item catalog lacks column\(s\) \['year'\]"):
        ItemCatalog.read(str(tmp_path / "ok.parquet"), ["genres", "year"])
    assert ItemCatalog.read(str(tmp_path / "ok.parquet"), ["genres"]).titles is None


# --------------------------------------------------------------------------- synthetic two-tower


def test_synthetic_two_tower_has_the_planted_structure(tmp_path):
    rows = 20_000
    meta = write_two_tower(tmp_path, rows, seed=3)
    log, truth = synthesize_two_tower(rows, seed=3)
    assert len(log["user"]) == rows == meta["counts"]["positives"]
    # timestamps increase per user; a user's picks are distinct
    order = np.lexsort((log["timestamp"], log["user"]))
    same = log["user"][order][1:] == log["user"][order][:-1]
    assert (np.diff(log["timestamp"][order])[same] > 0).all()
    pairs = log["user"] * 10_000 + log["item"]
    assert len(np.unique(pairs)) == rows

    train = pq.read_table(tmp_path / "train").to_pydict()
    ev = pq.read_table(tmp_path / "eval").to_pydict()
    items = pq.read_table(tmp_path / "items").to_pydict()
    assert items["item_id"] == list(range(1000)) and items["category"] == truth.item_category.tolist()
    assert 0.85 < np.mean(truth.item_category == truth.item_cluster) < 0.95
    # most targets lie in the user's preferred clusters
    in_cluster = [truth.user_weights[u, truth.item_cluster[t]] > 0 for u, ts in zip(ev["user_id"], ev["targets"])
                  for t in ts]
    assert np.mean(in_cluster) > 0.8
    # popularity is weak; ranking by the planted law is several times better
    pop = np.bincount(train["item_id"], minlength=1000).astype(float)
    law = truth.user_probs(np.array(ev["user_id"]))
    recall = {"popularity": [], "planted": []}
    for j, (targets, seen) in enumerate(zip(ev["targets"], ev["seen"])):
        for name, score in (("popularity", pop.copy()), ("planted", law[j].copy())):
            score[seen] = -1
            top = np.argsort(-score, kind="stable")[:10]
            recall[name].append(len(set(top.tolist()) & set(targets)) / len(targets))
    pop_r, planted_r = np.mean(recall["popularity"]), np.mean(recall["planted"])
    assert pop_r < 0.1 and planted_r > 4 * pop_r, (pop_r, planted_r)


def test_synth_cli_two_tower(tmp_path, capsys):
    from trainer.cli import main

    assert main(["data", "synth", "--schema", "two_tower", "--out", str(tmp_path), "--rows", "3000"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["items"] == 1000 and report["train_rows"] + report["targets"] == 3000
    assert {p.name for p in tmp_path.iterdir()} == {"train", "eval", "items", "meta.json"}


# --------------------------------------------------------------------------- MovieLens


@pytest.fixture(scope="module")
def movielens_retrieval(tmp_path_factory):
    if not (MOVIELENS / "ratings.csv").is_file():
        pytest.skip(f"MovieLens data not found at {MOVIELENS}")
    from data.movielens import convert_movielens_retrieval

    root = tmp_path_factory.mktemp("ml_retrieval")
    return root, convert_movielens_retrieval(MOVIELENS, root)


def test_movielens_retrieval_counts_and_rules(movielens_retrieval):
    root, meta = movielens_retrieval
    c = meta["counts"]
    assert (meta["num_users"], meta["num_items"]) == (610, 9742)
    assert (c["train_rows"], c["eval_users"], c["targets"], c["positives"]) == (38615, 608, 9965, 48580)
    assert c["train_rows"] + c["targets"] == c["positives"]  # no repeats / re-rated targets in this release
    ratings = pacsv.read_csv(MOVIELENS / "ratings.csv").to_pydict()
    movies = pacsv.read_csv(MOVIELENS / "movies.csv").to_pydict()
    items = pq.read_table(root / "items").to_pydict()
    assert items["raw_id"] == sorted(set(movies["movieId"]) | set(ratings["movieId"]))
    toy = items["raw_id"].index(1)
    names = meta["genre_names"]
    assert [names[g] for g in items["genres"][toy]] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert items["title"][toy] == "Toy Story (1995)" and items["year_bucket"][toy] == 1 + (1995 - 1900) // 5
    # every train row is a rating >= 4 of that user and movie
    rating = {(u, m): r for u, m, r in zip(ratings["userId"], ratings["movieId"], ratings["rating"])}
    users = sorted(set(ratings["userId"]))
    train = pq.read_table(root / "train").to_pydict()
    assert all(rating[(users[u], items["raw_id"][i])] >= 4.0 for u, i in zip(train["user_id"], train["item_id"]))
    assert max(len(h) for h in train["history"]) == 50
    genres = items["genres"]
    assert all(g == [x for i in h for x in genres[i]] for h, g in zip(train["history"], train["history_genres"]))
    assert meta["query_features"] == ["user_id", "history", "history_genres"]


def test_movielens_retrieval_cli_and_flag_checks(tmp_path, capsys):
    if not (MOVIELENS / "ratings.csv").is_file():
        pytest.skip(f"MovieLens data not found at {MOVIELENS}")
    from trainer.cli import main

    out = tmp_path / "ml"
    assert main(["data", "movielens", "--task", "retrieval", "--src", str(MOVIELENS), "--out", str(out),
                 "--max-history", "10", "--min-rating", "4.5"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["users"] == 610 and report["items"] == 9742 and report["positives"] < 48580
    assert max(len(h) for h in pq.read_table(out / "train").column("history").to_pylist()) == 10
    assert main(["data", "movielens", "--src", str(MOVIELENS), "--out", str(out), "--max-history", "10"]) != 0
    assert "--max-history is for --task retrieval" in capsys.readouterr().err
