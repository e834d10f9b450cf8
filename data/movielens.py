"""Turn a MovieLens release into a multi-task click log: Parquet train/eval splits plus meta.json.

Input: a folder laid out like ``ml-latest-small`` (any size): ``ratings.csv``
(``userId,movieId,rating,timestamp``) and ``movies.csv`` (``movieId,title,genres``) are required,
``tags.csv`` (``userId,movieId,tag,timestamp``) is optional. Files are read with a real CSV parser
(quoted titles with commas, CRLF line endings).

Output: ``OUT/train/part-00000.parquet``, ``OUT/eval/part-00000.parquet`` and ``OUT/meta.json``.
One row per rating, rows of each split in time order. Columns:

Labels
    ``click`` int64: 1 if ``rating >= 4.0`` else 0. ``rating`` float32: the raw 0.5-5 star rating.
Sparse ids (int64, dense vocabularies starting at 0; ``meta.json`` gives each size so tables can be
sized exactly)
    ``user_id``: users who rated, numbered by sorted ``userId``.
    ``movie_id``: every movie in ``movies.csv`` or ``ratings.csv``, numbered by sorted ``movieId``.
    ``genres`` list<int64>: the movie's genres, numbered alphabetically; ``(no genres listed)`` is
    a genre of its own, and a movie missing from ``movies.csv`` has an empty list.
    ``tags`` list<int64>: tag texts (lower-cased, stripped, numbered alphabetically) that any user
    had put on the movie strictly before this rating's timestamp. A tag's time on a movie is the
    first time anyone applied it there; the ``max_tags`` most recent such tags are kept, oldest
    first. Nothing from the future leaks in.
    ``rating_year``: calendar year (UTC) of the rating minus the first such year
    (``meta.json: rating_year_base``). ``hour`` (0-23 UTC) and ``weekday`` (0 = Monday).
Dense float32 (nullable)
    ``movie_year``: the year at the end of the title, ``Toy Story (1995)`` -> 1995 (a series'
    ``(2006–2007)`` gives its first year); null when the title has none.
    ``movie_age``: rating year - movie year; null when the movie year is unknown.
    ``user_prior_ratings`` / ``movie_prior_ratings``: how many ratings this user gave / this movie
    got before this one (raw counts; ``dense_transform = "log1p"`` suits them).
    ``user_prior_click_rate`` / ``movie_prior_click_rate``: mean ``click`` over those earlier
    ratings; null when there are none.
Not features (for humans and audits)
    ``movie_raw_id`` int64: the original ``movieId``. ``timestamp`` int64: the rating's Unix time.

Time order. All ratings are ordered by (timestamp, movieId, userId, line in ratings.csv); "before"
means earlier in that order, so equal timestamps are broken deterministically and no rating sees
itself. Prior counts and click rates use exactly the ratings before the row, in both splits: an
eval row's features are what a server would know when it is scored.

Split. Each user's ratings, in that order, are cut: the latest ``ceil(test_fraction * n)`` go to
eval, the rest to train, but every user keeps at least one train rating, so a user with a single
rating is all train. Every eval rating of a user is therefore later than all of its train ratings.
The cut is per user, not one global time: another user's train rows may be later than a user's
eval rows, so movie embeddings and a later train row's movie_prior_* features can carry what
happened after an eval event (the usual price of leave-latest-out splits; it is what lets every
user appear in eval). A global time cut would avoid it, at the cost of users seen only in eval.

Ratings of movies absent from ``movies.csv`` are kept (empty genres, null movie year) and counted
in ``meta.json: missing_movies``; tags on movies nobody rated and that ``movies.csv`` lacks cannot
reach any row and are counted too. Bad input raises ``DataError`` naming the file.

Retrieval (``convert_movielens_retrieval``, ``rectrain data movielens --task retrieval``): the same
reading, ids and time order, then data/retrieval.py's split and layout (OUT/train, OUT/eval,
OUT/items): positives are ratings >= 4 (``--min-rating``), item features ``genres`` (numbered as
above) and ``year_bucket``, the catalog holds every movie with its ``title`` and ``raw_id``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data.retrieval import write_splits
from data.schema import DataError

RATINGS_COLUMNS = {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
MOVIES_COLUMNS = {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}
TAGS_COLUMNS = {"userId": pa.int64(), "movieId": pa.int64(), "tag": pa.string(), "timestamp": pa.int64()}

CLICK_THRESHOLD = 4.0
LABEL_COLUMNS = ("click", "rating")
SPARSE_COLUMNS = ("user_id", "movie_id", "genres", "tags", "rating_year", "hour", "weekday")
DENSE_COLUMNS = ("movie_year", "movie_age", "user_prior_ratings", "movie_prior_ratings",
                 "user_prior_click_rate", "movie_prior_click_rate")
INFO_COLUMNS = ("movie_raw_id", "timestamp")

# A title ends with "(1995)", or "(2006–2007)" / "(2006-)" for series; RE2 syntax for pyarrow.
_TITLE_YEAR = r"\((?P<year>\d{4})(?:\s*[-–]\s*\d{0,4})?\)$"
# 1970-01-01 was a Thursday; shifting by 3 days makes Monday 0, as in Python's datetime.
_EPOCH_WEEKDAY = 3

RULES = (
    f"click = 1 if rating >= {CLICK_THRESHOLD} else 0",
    "time order: (timestamp, movieId, userId, line in ratings.csv); 'before' means earlier in it",
    "split per user: latest ceil(test_fraction * n) ratings to eval, at least one kept in train "
    "(single-rating users are all train); per user, not a global time cut, so other users' train "
    "rows may be later than an eval row",
    "prior counts and click rates: over the user's / movie's ratings before the row, full history "
    "for eval rows too; click rates null when there are none",
    "tags: distinct lower-cased, stripped tags put on the movie strictly before the rating's "
    "timestamp (a tag's time = its first use on that movie), the max_tags most recent, oldest first",
    "ids are dense from 0: users and movies by sorted original id, genres and tags alphabetically, "
    "rating_year = year - rating_year_base, hour 0-23 UTC, weekday 0 = Monday",
    "movie_year from the title's trailing (YYYY); movie_age = rating year - movie year; null if unknown",
    "ratings of movies missing from movies.csv are kept with empty genres and counted",
)


def convert_movielens(src: str | Path, out: str | Path, *, test_fraction: float = 0.2, max_tags: int = 20,
                      row_group_rows: int = 65536) -> dict:
    """Convert the release in `src` into `out` (see the module docstring); returns meta.json's
    content plus the written ``paths``."""
    _check_params(test_fraction, max_tags, row_group_rows)
    src, out = Path(src), Path(out)
    table, facts = _click_log(*_read_release(src), src, max_tags)
    in_eval = _eval_mask(table.column("user_id").to_numpy(), table.column("user_prior_ratings").to_numpy(),
                         test_fraction)
    splits = {"train": table.filter(pa.array(~in_eval)), "eval": table.filter(pa.array(in_eval))}
    meta = {
        "source": str(src),
        "ratings": table.num_rows,
        **facts,
        "splits": {name: _split_stats(t) for name, t in splits.items()},
        "params": {"test_fraction": test_fraction, "max_tags": max_tags},
        "columns": [{"name": f.name, "type": str(f.type), "role": _role(f.name)} for f in table.schema],
        "label_columns": list(LABEL_COLUMNS),
        "dense_columns": list(DENSE_COLUMNS),
        "sparse_columns": list(SPARSE_COLUMNS),
        "rules": list(RULES),
    }
    paths = write_splits(out, splits, meta, row_group_rows)
    return {**meta, "paths": {k: str(p) for k, p in paths.items()}}


def _click_log(ratings: pa.Table, movies: pa.Table, tags: pa.Table | None, src: Path,
               max_tags: int) -> tuple[pa.Table, dict]:
    """Every rating as a row with its labels and features, in time order, plus the vocabulary
    sizes and counts that meta.json reports."""
    r = _ratings_in_time_order(ratings)
    movie_raw = np.unique(np.concatenate([r["movie_raw"], movies.column("movieId").to_numpy()]))
    movie = np.searchsorted(movie_raw, r["movie_raw"])
    user_raw, user = np.unique(r["user_raw"], return_inverse=True)
    click = (r["rating"] >= CLICK_THRESHOLD).astype(np.int64)

    catalog = _movie_catalog(movies, movie_raw, src / "movies.csv")
    genres = _gather_ranges(catalog["genre_start"][movie], catalog["genre_count"][movie], catalog["genre_ids"])
    tag_list, tag_vocab, tag_report = _tags_before(tags, movie_raw, movie, r["timestamp"], max_tags)
    time = _time_ids(r["timestamp"])
    movie_year = catalog["year"][movie]
    user_prior, user_clicks = _prior_counts(user, click)
    movie_prior, movie_clicks = _prior_counts(movie, click)

    table = pa.table({
        "click": click,
        "rating": r["rating"].astype(np.float32),
        "user_id": user.astype(np.int64),
        "movie_id": movie.astype(np.int64),
        "genres": genres,
        "tags": tag_list,
        "rating_year": time["rating_year"],
        "hour": time["hour"],
        "weekday": time["weekday"],
        "movie_year": _nullable(movie_year),
        "movie_age": _nullable(time["year"] - movie_year),
        "user_prior_ratings": user_prior.astype(np.float32),
        "movie_prior_ratings": movie_prior.astype(np.float32),
        "user_prior_click_rate": _rate(user_clicks, user_prior),
        "movie_prior_click_rate": _rate(movie_clicks, movie_prior),
        "movie_raw_id": r["movie_raw"],
        "timestamp": r["timestamp"],
    })
    missing = ~catalog["listed"][movie]
    facts = {
        "vocab_sizes": {
            "user_id": len(user_raw),
            "movie_id": len(movie_raw),
            "genres": len(catalog["genre_names"]),
            "tags": len(tag_vocab),
            "rating_year": time["year_count"],
            "hour": 24,
            "weekday": 7,
        },
        "rating_year_base": time["year_base"],
        "genre_names": catalog["genre_names"],
        "missing_movies": {
            "ratings": int(missing.sum()),
            "movies": len(np.unique(movie[missing])),
            "example_movie_ids": np.unique(r["movie_raw"][missing])[:10].tolist(),
        },
        "tags": tag_report,
    }
    return table, facts


# --------------------------------------------------------------------------- reading


def _check_params(test_fraction: float, max_tags: int, row_group_rows: int) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if max_tags < 0:
        raise DataError(f"--max-tags must be 0 or more, got {max_tags}")
    if row_group_rows <= 0:
        raise DataError(f"--row-group-rows must be positive, got {row_group_rows}")


def _read_release(src: Path) -> tuple[pa.Table, pa.Table, pa.Table | None]:
    """ratings.csv, movies.csv and (if the release has it) tags.csv."""
    ratings = _read_csv(src / "ratings.csv", RATINGS_COLUMNS)
    if ratings.num_rows == 0:
        raise DataError(f"{src / 'ratings.csv'}: holds no ratings; pass a MovieLens release with ratings")
    movies = _read_csv(src / "movies.csv", MOVIES_COLUMNS)
    tags = _read_csv(src / "tags.csv", TAGS_COLUMNS) if (src / "tags.csv").exists() else None
    return ratings, movies, tags


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _read_csv(path: Path, columns: dict[str, pa.DataType]) -> pa.Table:
    """The file's `columns` with their types; DataError naming the file for anything unusable."""
    header = ",".join(columns)
    if not path.is_file():
        raise DataError(f"{path}: not found; --src must be a MovieLens release folder (like ml-latest-small) "
                        f"holding ratings.csv and movies.csv")
    # Empty fields are the only nulls: a title or tag reading "NA" is text, not a missing value.
    options = pacsv.ConvertOptions(column_types=columns, null_values=[""], strings_can_be_null=False)
    try:
        table = pacsv.read_csv(path, convert_options=options)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot be read as CSV with header {header} ({_one_line(e)}); "
                        f"fix the file or re-download the release") from None
    absent = [c for c in columns if c not in table.column_names]
    if absent:
        raise DataError(f"{path}: header lacks {', '.join(absent)}; the first line must name "
                        f"{header} as in a MovieLens release")
    table = table.select(list(columns))
    for c in columns:
        if table.column(c).null_count:
            raise DataError(f"{path}: column {c} has {table.column(c).null_count} empty values; "
                            f"fill or drop those lines")
    return table


def _ratings_in_time_order(ratings: pa.Table) -> dict[str, np.ndarray]:
    """Rating columns as numpy, sorted by (timestamp, movieId, userId, line)."""
    cols = {name: ratings.column(c).to_numpy()
            for name, c in (("user_raw", "userId"), ("movie_raw", "movieId"), ("rating", "rating"),
                            ("timestamp", "timestamp"))}
    # lexsort is stable, so the file line breaks the remaining ties.
    order = np.lexsort((cols["user_raw"], cols["movie_raw"], cols["timestamp"]))
    return {name: v[order] for name, v in cols.items()}


def _movie_catalog(movies: pa.Table, movie_raw: np.ndarray, path: Path) -> dict:
    """Per movie id (index into `movie_raw`): listed in movies.csv, title year, and genre ranges
    into the flat ``genre_ids``."""
    ids = movies.column("movieId").to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{path}: movieId {uniq[counts > 1][0]} is listed {counts.max()} times; "
                        f"each movie must appear once")
    row = np.searchsorted(movie_raw, ids)

    split = pc.split_pattern(movies.column("genres").combine_chunks(), "|")
    names = pc.list_flatten(split)
    parents = pc.list_parent_indices(split).to_numpy()
    present = pc.not_equal(names, "").to_numpy(zero_copy_only=False)  # an empty genres field is no genre
    genre_names = sorted(set(names.filter(pa.array(present)).to_pylist()))
    genre_ids = pc.index_in(names.filter(pa.array(present)), value_set=pa.array(genre_names)).to_numpy()
    per_movie = np.bincount(parents[present], minlength=len(ids))
    start_in_csv = np.concatenate([[0], np.cumsum(per_movie)[:-1]])

    n = len(movie_raw)
    catalog = {
        "listed": np.zeros(n, dtype=bool),
        "year": np.full(n, np.nan, dtype=np.float32),
        "genre_start": np.zeros(n, dtype=np.int64),
        "genre_count": np.zeros(n, dtype=np.int64),
        "genre_ids": genre_ids.astype(np.int64),
        "genre_names": genre_names,
    }
    catalog["listed"][row] = True
    catalog["year"][row] = _title_years(movies.column("title"))
    catalog["genre_start"][row] = start_in_csv
    catalog["genre_count"][row] = per_movie
    return catalog


def _title_years(titles: pa.ChunkedArray) -> np.ndarray:
    """The trailing (YYYY) of each title as float32, NaN where there is none."""
    match = pc.extract_regex(pc.utf8_trim_whitespace(titles), _TITLE_YEAR).combine_chunks()
    years = pc.cast(match.field("year").filter(match.is_valid()), pa.float32()).to_numpy()
    out = np.full(len(match), np.nan, dtype=np.float32)
    out[match.is_valid().to_numpy(zero_copy_only=False)] = years
    return out


# --------------------------------------------------------------------------- features


def _gather_ranges(starts: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """Row i holds ``values[starts[i] : starts[i] + lengths[i]]``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    # int32 offsets as the reader expects list<int64>; pyarrow refuses (not wraps) an overflow.
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values[index], type=pa.int64()))


def _tags_before(tags: pa.Table | None, movie_raw: np.ndarray, movie: np.ndarray, timestamp: np.ndarray,
                 max_tags: int) -> tuple[pa.ListArray, list[str], dict]:
    """Per rating: ids of the tags on its movie strictly before its timestamp (module docstring)."""
    n = len(movie)
    if tags is None:
        nothing = np.zeros(n, np.int64)
        report = {"file": False, "events": 0, "on_unknown_movies": 0, "movie_tag_pairs": 0}
        return _gather_ranges(nothing, nothing, np.zeros(0, np.int64)), [], report
    text = pc.utf8_trim_whitespace(pc.utf8_lower(tags.column("tag")))
    keep = pc.not_equal(text, "")
    text = text.filter(keep)
    tag_movie_raw = tags.column("movieId").filter(keep).to_numpy()
    tag_ts = tags.column("timestamp").filter(keep).to_numpy()
    vocab = sorted(pc.unique(text).to_pylist())
    tag_id = pc.index_in(text, value_set=pa.array(vocab, pa.string())).to_numpy().astype(np.int64)

    pos = np.minimum(np.searchsorted(movie_raw, tag_movie_raw), len(movie_raw) - 1)
    known = movie_raw[pos] == tag_movie_raw
    ev_movie, ev_tag, ev_ts = pos[known], tag_id[known], tag_ts[known]
    # A (movie, tag) pair counts from its first use: sort by time, keep each pair's first event.
    order = np.lexsort((ev_ts, ev_tag, ev_movie))
    ev_movie, ev_tag, ev_ts = ev_movie[order], ev_tag[order], ev_ts[order]
    first = np.r_[True, (ev_movie[1:] != ev_movie[:-1]) | (ev_tag[1:] != ev_tag[:-1])]
    ev_movie, ev_tag, ev_ts = ev_movie[first], ev_tag[first], ev_ts[first]
    order = np.lexsort((ev_tag, ev_ts, ev_movie))
    ev_movie, ev_tag, ev_ts = ev_movie[order], ev_tag[order], ev_ts[order]

    # Merge ratings and tag events by (movie, time); at equal time the rating sorts first, so a
    # tag put on at the rating's second is not "before" it. The running tag count at a rating is
    # then the end of its movie's tags-so-far range in the (movie, time)-sorted events.
    is_tag = np.r_[np.zeros(n, np.int64), np.ones(len(ev_movie), np.int64)]
    merged = np.lexsort((is_tag, np.r_[timestamp, ev_ts], np.r_[movie, ev_movie]))
    running = np.cumsum(is_tag[merged])
    end = np.empty(n, dtype=np.int64)
    rating_rows = merged[is_tag[merged] == 0]
    end[rating_rows] = running[is_tag[merged] == 0]
    movie_start = np.searchsorted(ev_movie, movie, side="left")
    start = np.maximum(movie_start, end - max_tags)
    report = {"file": True, "events": int(tags.num_rows), "on_unknown_movies": int((~known).sum()),
              "movie_tag_pairs": int(len(ev_movie))}
    return _gather_ranges(start, end - start, ev_tag), vocab, report


def _time_ids(timestamp: np.ndarray) -> dict[str, np.ndarray]:
    """Calendar year, the year id, hour of day and weekday (UTC) of Unix timestamps."""
    year = timestamp.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    base = int(year.min())
    return {
        "year": year.astype(np.float32),
        "year_base": base,
        "year_count": int(year.max()) - base + 1,
        "rating_year": year - base,
        "hour": (timestamp // 3600) % 24,
        "weekday": (timestamp // 86400 + _EPOCH_WEEKDAY) % 7,
    }


def _prior_counts(group: np.ndarray, click: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows in time order: how many earlier rows share the row's group, and how many of
    those clicked."""
    n = len(group)
    by_group = np.argsort(group, kind="stable")  # stable keeps time order inside a group
    g = group[by_group]
    c = click[by_group]
    starts = np.r_[True, g[1:] != g[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    clicks_before = np.cumsum(c) - c
    count = np.empty(n, dtype=np.int64)
    clicks = np.empty(n, dtype=np.int64)
    count[by_group] = np.arange(n) - group_start
    clicks[by_group] = clicks_before - clicks_before[group_start]
    return count, clicks


def _eval_mask(user: np.ndarray, prior: np.ndarray, test_fraction: float) -> np.ndarray:
    """True for each user's latest ceil(test_fraction * n) ratings, keeping one in train."""
    n = np.bincount(user)
    # The epsilon keeps e.g. 0.2 * 15 = 3.0000000000000004 from rounding up to 4.
    n_eval = np.minimum(np.ceil(test_fraction * n - 1e-9).astype(np.int64), n - 1)
    return prior >= (n - n_eval)[user]


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.float32), mask=np.isnan(values))


def _rate(clicks: np.ndarray, count: np.ndarray) -> pa.Array:
    rate = clicks / np.maximum(count, 1)
    return pa.array(rate.astype(np.float32), mask=count == 0)


# --------------------------------------------------------------------------- output


def _role(column: str) -> str:
    for role, names in (("label", LABEL_COLUMNS), ("sparse", SPARSE_COLUMNS), ("dense", DENSE_COLUMNS)):
        if column in names:
            return role
    return "info"


def _split_stats(table: pa.Table) -> dict:
    click = table.column("click").to_numpy()
    rating = table.column("rating").to_numpy().astype(np.float64)
    empty = table.num_rows == 0
    return {
        "rows": table.num_rows,
        "users": len(pc.unique(table.column("user_id"))),
        "click_rate": None if empty else float(click.mean()),
        "rating_mean": None if empty else float(rating.mean()),
        "rating_var": None if empty else float(rating.var()),
    }


# --------------------------------------------------------------------------- retrieval task

POSITIVE_RATING = 4.0
# Release year buckets of 5 years from 1900 (0: year unknown; 1: up to 1904; ...; the last: 2020 on).
YEAR_BUCKET_BASE, YEAR_BUCKET_SPAN, YEAR_BUCKETS = 1900, 5, 26
# Item features also written over each row's history (``history_genres``: the genres of the
# user's earlier positives, repeats kept, so mean pooling gives the user's genre taste).
HISTORY_FEATURES = ("genres",)


def convert_movielens_retrieval(src: str | Path, out: str | Path, *, max_history: int = 50,
                                test_fraction: float = 0.2, min_rating: float = POSITIVE_RATING,
                                row_group_rows: int = 65536) -> dict:
    """Two-tower retrieval data from the release in `src` (the layout of data/retrieval.py):
    positives are ratings >= `min_rating`; users are numbered by sorted ``userId`` (every user
    who rated), items are every movie of ``movies.csv`` or ``ratings.csv`` numbered by sorted
    ``movieId`` (``raw_id``). Item features: ``genres`` list<int64> (numbered alphabetically as in
    the multi-task conversion) and ``year_bucket`` int64 (the title's year in 5-year buckets, 0
    if unknown). Query feature ``history_genres`` list<int64>: the genres of every history movie
    (repeats kept). The catalog's ``title`` is null for movies missing from ``movies.csv``.
    Returns meta.json's content plus the written ``paths``."""
    from data.retrieval import Feature, items_table, split_interactions, write_retrieval

    _check_params(test_fraction, 0, row_group_rows)
    if not math.isfinite(min_rating):
        raise DataError(f"--min-rating must be a finite number of stars, got {min_rating}")
    src, out = Path(src), Path(out)
    ratings, movies, _ = _read_release(src)
    r = _ratings_in_time_order(ratings)
    movie_raw = np.unique(np.concatenate([r["movie_raw"], movies.column("movieId").to_numpy()]))
    movie = np.searchsorted(movie_raw, r["movie_raw"])
    user_raw, user = np.unique(r["user_raw"], return_inverse=True)
    catalog = _movie_catalog(movies, movie_raw, src / "movies.csv")

    count = catalog["genre_count"]
    offsets = np.zeros(len(movie_raw) + 1, dtype=np.int64)
    np.cumsum(count, out=offsets[1:])
    index = np.repeat(catalog["genre_start"] - offsets[:-1], count) + np.arange(offsets[-1])
    year = catalog["year"]
    known = ~np.isnan(year)
    bucket = np.zeros(len(movie_raw), dtype=np.int64)
    bucket[known] = 1 + np.clip((year[known].astype(np.int64) - YEAR_BUCKET_BASE) // YEAR_BUCKET_SPAN,
                                0, YEAR_BUCKETS - 2)
    item_features = {
        "genres": Feature(len(catalog["genre_names"]), catalog["genre_ids"][index], offsets),
        "year_bucket": Feature(YEAR_BUCKETS, bucket),
    }
    titles: list[str | None] = [None] * len(movie_raw)
    for i, title in zip(np.searchsorted(movie_raw, movies.column("movieId").to_numpy()),
                        movies.column("title").to_pylist()):
        titles[i] = title

    split = split_interactions(user.astype(np.int64), movie.astype(np.int64), r["timestamp"],
                               r["rating"] >= min_rating, num_users=len(user_raw), num_items=len(movie_raw),
                               max_history=max_history, test_fraction=test_fraction, item_features=item_features,
                               history_features=HISTORY_FEATURES)
    missing = ~catalog["listed"][movie]
    extra = {
        "source": str(src),
        "ratings": int(len(movie)),
        "min_rating": min_rating,
        "missing_movies": {"ratings": int(missing.sum()), "movies": int(len(np.unique(movie[missing])))},
        "genre_names": catalog["genre_names"],
        "year_buckets": {"base": YEAR_BUCKET_BASE, "span": YEAR_BUCKET_SPAN, "count": YEAR_BUCKETS,
                         "unknown": 0},
    }
    items = items_table(len(movie_raw), item_features, movie_raw, titles)
    return write_retrieval(out, split, items, extra, row_group_rows)
