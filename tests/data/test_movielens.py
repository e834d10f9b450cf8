"""data/movielens.py: exact values on a hand-made release, invariants on ml-latest-small."""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data.movielens import DENSE_COLUMNS, LABEL_COLUMNS, SPARSE_COLUMNS, convert_movielens
from data.schema import DataError

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "movielens-latest-small"

# Monday 2000-01-03 10:00:00 UTC.
T0 = 946_893_600
DAY = 86_400

MOVIES = [
    "movieId,title,genres",
    '10,"Heat, The (1995)",Action|Crime|Thriller',
    "20,Babylon 5,Sci-Fi",
    '30,"Say ""Hello"" (2001) ",(no genres listed)',
    "50,Zed (1980),Drama|Action",
]
# (userId, movieId, rating, timestamp), deliberately not in time order. Movies 40 and 60 are not
# in movies.csv. Users 5 and 7 rate movie 10 at the same second, as do user 3's movies 20 and 30.
RATINGS = [
    (7, 10, 5.0, T0 + 100), (3, 10, 4.0, T0), (3, 30, 5.0, T0 + 100), (3, 20, 3.5, T0 + 100),
    (5, 10, 1.0, T0 + 100), (3, 40, 2.0, T0 + 200), (7, 20, 4.0, T0 + 300), (7, 30, 0.5, T0 + 400),
    (7, 50, 3.0, T0 + 500), (7, 40, 4.0, T0 + 700), (7, 60, 4.0, T0 + 800), (3, 10, 4.5, T0 + 400 * DAY),
]
TAGS = [
    "userId,movieId,tag,timestamp",
    f'9,10," Classic ",{T0 - 10}',
    f"9,10,CLASSIC,{T0 + 500}",  # re-use: the tag still dates from its first use
    f'8,10,"heist, crime",{T0 + 100}',  # same second as ratings: not before them
    f"8,10,pacino,{T0 + 150}",
    f"9,99,orphan,{T0}",  # a movie nobody rated and movies.csv lacks
    f"8,20,   ,{T0}",  # blank after stripping: dropped
]
# Expected rows in global time order (timestamp, movieId, userId):
# user, movie, click, split, user prior (count, rate), movie prior (count, rate), tags, hour, weekday, year id
EXPECTED = [
    (3, 10, 1, "train", 0, None, 0, None, [0], 10, 0, 0),
    (5, 10, 0, "train", 0, None, 1, 1.0, [0], 10, 0, 0),
    (7, 10, 1, "train", 0, None, 2, 0.5, [0], 10, 0, 0),
    (3, 20, 0, "train", 1, 1.0, 0, None, [], 10, 0, 0),
    (3, 30, 1, "train", 2, 0.5, 0, None, [], 10, 0, 0),
    (3, 40, 0, "train", 3, 2 / 3, 0, None, [], 10, 0, 0),
    (7, 20, 1, "train", 1, 1.0, 1, 0.0, [], 10, 0, 0),
    (7, 30, 0, "train", 2, 1.0, 1, 1.0, [], 10, 0, 0),
    (7, 50, 0, "train", 3, 2 / 3, 0, None, [], 10, 0, 0),
    (7, 40, 1, "eval", 4, 0.5, 1, 0.0, [], 10, 0, 0),
    (7, 60, 1, "eval", 5, 0.6, 0, None, [], 10, 0, 0),
    (3, 10, 1, "eval", 4, 0.5, 3, 2 / 3, [0, 1, 3], 10, 1, 1),
]
USER_ID = {3: 0, 5: 1, 7: 2}
MOVIE_ID = {10: 0, 20: 1, 30: 2, 40: 3, 50: 4, 60: 5}
GENRES = ["(no genres listed)", "Action", "Crime", "Drama", "Sci-Fi", "Thriller"]
MOVIE_GENRES = {10: [1, 2, 5], 20: [4], 30: [0], 40: [], 50: [3, 1], 60: []}
MOVIE_YEAR = {10: 1995.0, 20: None, 30: 2001.0, 40: None, 50: 1980.0, 60: None}


def _write_release(root: Path, tags: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ratings = ["userId,movieId,rating,timestamp"] + [f"{u},{m},{r},{t}" for u, m, r, t in RATINGS]
    files = {"movies.csv": MOVIES, "ratings.csv": ratings, **({"tags.csv": TAGS} if tags else {})}
    for name, lines in files.items():
        (root / name).write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return root


def _read(out: Path) -> dict[str, pa.Table]:
    return {s: pq.read_table(out / s / "part-00000.parquet") for s in ("train", "eval")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    report = convert_movielens(_write_release(root / "src"), root / "out")
    return report, _read(root / "out"), json.loads((root / "out" / "meta.json").read_text())


# --------------------------------------------------------------------------- hand-made release


def test_tiny_columns_and_types(tiny):
    _, splits, meta = tiny
    schema = splits["train"].schema
    assert schema.names == [*LABEL_COLUMNS, *SPARSE_COLUMNS, *DENSE_COLUMNS, "movie_raw_id", "timestamp"]
    assert schema.field("click").type == pa.int64() and schema.field("rating").type == pa.float32()
    for c in SPARSE_COLUMNS:
        want = pa.list_(pa.int64()) if c in ("genres", "tags") else pa.int64()
        assert schema.field(c).type == want, c
    for c in DENSE_COLUMNS:
        assert schema.field(c).type == pa.float32(), c
    assert [c["name"] for c in meta["columns"]] == schema.names
    assert {c["name"]: c["role"] for c in meta["columns"]}["timestamp"] == "info"


def test_tiny_every_value(tiny):
    _, splits, _ = tiny
    rows = {s: t.to_pylist() for s, t in splits.items()}
    expected = {"train": [e for e in EXPECTED if e[3] == "train"], "eval": [e for e in EXPECTED if e[3] == "eval"]}
    ratings = {(u, m, t): r for u, m, r, t in RATINGS}
    for split in ("train", "eval"):
        assert len(rows[split]) == len(expected[split])
        for got, (user, movie, click, _, u_n, u_rate, m_n, m_rate, tags, hour, weekday, year) in zip(
                rows[split], expected[split]):
            where = (split, user, movie)
            assert (got["user_id"], got["movie_id"], got["movie_raw_id"]) == (USER_ID[user], MOVIE_ID[movie], movie)
            assert got["rating"] == ratings[(user, movie, got["timestamp"])]
            assert got["click"] == click == int(got["rating"] >= 4.0), where
            assert got["user_prior_ratings"] == u_n and got["movie_prior_ratings"] == m_n, where
            assert got["user_prior_click_rate"] == pytest.approx(u_rate), where
            assert got["movie_prior_click_rate"] == pytest.approx(m_rate), where
            assert got["tags"] == tags, where
            assert got["genres"] == MOVIE_GENRES[movie], where
            assert (got["hour"], got["weekday"], got["rating_year"]) == (hour, weekday, year), where
            assert got["movie_year"] == MOVIE_YEAR[movie], where
            movie_age = None if MOVIE_YEAR[movie] is None else 2000 + year - MOVIE_YEAR[movie]
            assert got["movie_age"] == movie_age, where


def test_tiny_meta_and_report(tiny):
    report, _, meta = tiny
    assert meta["vocab_sizes"] == {"user_id": 3, "movie_id": 6, "genres": 6, "tags": 4, "rating_year": 2,
                                   "hour": 24, "weekday": 7}
    assert meta["genre_names"] == GENRES
    assert meta["rating_year_base"] == 2000
    assert meta["ratings"] == len(RATINGS)
    assert meta["missing_movies"] == {"ratings": 3, "movies": 2, "example_movie_ids": [40, 60]}
    assert meta["tags"] == {"file": True, "events": 6, "on_unknown_movies": 1, "movie_tag_pairs": 3}
    train, ev = meta["splits"]["train"], meta["splits"]["eval"]
    assert (train["rows"], ev["rows"]) == (9, 3)
    assert train["click_rate"] == pytest.approx(4 / 9) and ev["click_rate"] == 1.0
    train_ratings = [5.0, 4.0, 3.5, 5.0, 1.0, 2.0, 4.0, 0.5, 3.0]
    assert train["rating_mean"] == pytest.approx(np.mean(train_ratings))
    assert train["rating_var"] == pytest.approx(np.var(train_ratings))
    assert ev["rating_var"] == pytest.approx(np.var([4.0, 4.0, 4.5]))
    assert {k: Path(v).name for k, v in report["paths"].items()} == {
        "train": "part-00000.parquet", "eval": "part-00000.parquet", "meta": "meta.json"}
    assert report["vocab_sizes"] == meta["vocab_sizes"]


def test_tiny_tag_cap_keeps_most_recent(tmp_path):
    convert_movielens(_write_release(tmp_path / "src"), tmp_path / "out", max_tags=2)
    tags = _read(tmp_path / "out")["eval"].column("tags").to_pylist()
    assert tags[-1] == [1, 3]  # "heist, crime" and "pacino"; "classic" is the oldest


def test_tiny_without_tags_file(tmp_path):
    report = convert_movielens(_write_release(tmp_path / "src", tags=False), tmp_path / "out")
    splits = _read(tmp_path / "out")
    assert report["vocab_sizes"]["tags"] == 0 and report["tags"]["file"] is False
    for table in splits.values():
        assert pc.sum(pc.list_value_length(table.column("tags"))).as_py() == 0


@pytest.mark.parametrize("name", ["ratings.csv", "movies.csv"])
def test_missing_file_names_it(tmp_path, name):
    src = _write_release(tmp_path / "src")
    (src / name).unlink()
    with pytest.raises(DataError, match=name) as err:
        convert_movielens(src, tmp_path / "out")
    assert "\n" not in str(err.value)


def test_missing_header_column_names_file_and_column(tmp_path):
    src = _write_release(tmp_path / "src")
    (src / "ratings.csv").write_text("userId,movieId,stars,timestamp\n1,2,3.0,4\n")
    with pytest.raises(DataError, match=r"ratings\.csv: header lacks rating"):
        convert_movielens(src, tmp_path / "out")


def test_bad_values_and_params_are_data_errors(tmp_path):
    src = _write_release(tmp_path / "src")
    (src / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,10,x,soon\n")
    with pytest.raises(DataError, match=r"tags\.csv"):
        convert_movielens(src, tmp_path / "out")
    with pytest.raises(DataError, match="test-fraction"):
        convert_movielens(src, tmp_path / "out", test_fraction=1.0)


# --------------------------------------------------------------------------- ml-latest-small


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not (REAL / "ratings.csv").is_file():
        pytest.skip(f"{REAL} is absent")
    out = tmp_path_factory.mktemp("ml")
    report = convert_movielens(REAL, out)
    return report, _read(out), json.loads((out / "meta.json").read_text())


def test_real_row_counts_and_labels(real):
    report, splits, meta = real
    lines = pacsv.read_csv(REAL / "ratings.csv").num_rows
    assert splits["train"].num_rows + splits["eval"].num_rows == lines == meta["ratings"]
    for name, table in splits.items():
        rating = table.column("rating").to_numpy()
        np.testing.assert_array_equal(table.column("click").to_numpy(), (rating >= 4.0).astype(np.int64))
        assert meta["splits"][name]["rows"] == table.num_rows
        assert meta["splits"][name]["click_rate"] == pytest.approx((rating >= 4.0).mean())
        assert meta["splits"][name]["rating_var"] == pytest.approx(rating.astype(np.float64).var())
    assert report["missing_movies"]["ratings"] == 0


def test_real_split_is_per_user_in_time(real):
    _, splits, _ = real
    keys = {}
    for name, table in splits.items():
        user = table.column("user_id").to_numpy()
        ts = table.column("timestamp").to_numpy()
        raw = table.column("movie_raw_id").to_numpy()
        for u in np.unique(user):
            sel = user == u
            keys.setdefault(u, {})[name] = sorted(zip(ts[sel], raw[sel]))
    for u, parts in keys.items():
        train, ev = parts.get("train", []), parts.get("eval", [])
        n = len(train) + len(ev)
        assert len(ev) == (math.ceil(n / 5) if n > 1 else 0), u
        if ev:
            assert max(train) < min(ev), u


def test_real_ids_dense_within_vocab(real):
    _, splits, meta = real
    table = pa.concat_tables(splits.values())
    for c in SPARSE_COLUMNS:
        col = table.column(c)
        values = pc.list_flatten(col) if pa.types.is_list(col.type) else col
        assert col.null_count == 0, c
        values = values.to_numpy()
        assert values.min() >= 0 and values.max() < meta["vocab_sizes"][c], c
    for c in ("user_id", "genres", "hour", "weekday", "rating_year"):
        col = table.column(c)
        values = pc.list_flatten(col) if pa.types.is_list(col.type) else col
        assert len(pc.unique(values)) == meta["vocab_sizes"][c], c
    movies = pacsv.read_csv(REAL / "movies.csv")
    assert meta["vocab_sizes"]["movie_id"] == movies.num_rows  # every rated movie is listed


def test_real_known_movie_genres_and_year(real):
    _, splits, meta = real
    table = splits["train"]
    toy_story = table.filter(pc.equal(table.column("movie_raw_id"), 1)).slice(0, 1).to_pylist()[0]
    names = [meta["genre_names"][g] for g in toy_story["genres"]]
    assert names == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert toy_story["movie_year"] == 1995.0
    assert "(no genres listed)" in meta["genre_names"]


def test_real_tags_strictly_earlier_and_complete(real):
    _, splits, meta = real
    tags = pacsv.read_csv(REAL / "tags.csv").to_pylist()
    first_use: dict[tuple[int, str], int] = {}
    for t in tags:
        key = (t["movieId"], str(t["tag"]).strip().lower())
        first_use[key] = min(first_use.get(key, t["timestamp"]), t["timestamp"])
    times: dict[int, list[int]] = {}
    for (movie, _), ts in first_use.items():
        times.setdefault(movie, []).append(ts)
    for v in times.values():
        v.sort()
    # Tag ids number the sorted distinct texts, so rebuild the vocabulary to read them back.
    vocab = sorted({text for _, text in first_use})
    assert len(vocab) == meta["vocab_sizes"]["tags"]
    seen = 0
    for table in splits.values():
        cols = table.select(["movie_raw_id", "timestamp", "tags"]).to_pydict()
        for movie, ts, ids in zip(cols["movie_raw_id"], cols["timestamp"], cols["tags"]):
            for i in ids:
                assert first_use[(movie, vocab[i])] < ts
            assert len(ids) == len(set(ids)) == min(20, bisect_left(times.get(movie, []), ts))
            seen += len(ids)
    assert seen > 10_000  # the check above ran on real tag lists, not only on empty ones


def test_real_prior_features_match_history(real):
    _, splits, _ = real
    table = pa.concat_tables(splits.values())
    user = table.column("user_id").to_numpy()
    order = np.lexsort((user, table.column("movie_raw_id").to_numpy(), table.column("timestamp").to_numpy()))
    user = user[order]
    click = table.column("click").to_numpy()[order]
    prior = table.column("user_prior_ratings").to_numpy()[order]
    rate = table.column("user_prior_click_rate").to_numpy(zero_copy_only=False)[order]
    count: dict[int, int] = {}
    clicks: dict[int, int] = {}
    for u, c, p, r in zip(user.tolist(), click.tolist(), prior.tolist(), rate.tolist()):
        n = count.get(u, 0)
        assert p == n
        assert np.isnan(r) if n == 0 else abs(r - clicks[u] / n) < 1e-6
        count[u], clicks[u] = n + 1, clicks.get(u, 0) + c
