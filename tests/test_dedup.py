"""Claims about dedup.py: MinHash/LSH merges planted pairs as the S-curve 1-(1-s^r)^b predicts (recall >= 0.95 at
Jaccard >= 0.85, <= 1% merged at <= 0.4, in Japanese and English); exact duplicates always collide; union-find
matches the textbook version; the knowledge probe counts copies once; repeated lines are counted exactly in bounded
memory; rows grouped by key in bounded memory give exactly the groups a dict gives, even for a key too frequent for
memory; exact dedup of 2M documents stays within its memory budget while spilling; connected components over edges
spread across ranks equal union-find's, on one rank and on two (gloo)."""

import os
import random
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dedup  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
JA = open(os.path.join(DATA, "ja_sample.txt"), encoding="utf-8").read().split("\n\n")
EN = open(os.path.join(DATA, "en_sample.txt"), encoding="utf-8").read().split("\n\n")
KANA = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x4E00, 0x4E00 + 300)]


def random_unit(rng, lang):
    # English: a random 6-letter word; Japanese: a random kana or kanji (one unit = one character)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) if lang == "en" else rng.choice(KANA)


def planted_pair(rng, lang, n_units=300):
    """A document and a copy with a random share of its units replaced: Jaccard spread over [0, 1]."""
    units = [random_unit(rng, lang) for _ in range(n_units)]
    copy = list(units)
    p = rng.choice([rng.uniform(0, 0.015), rng.uniform(0.015, 0.06), rng.uniform(0.06, 0.5)])
    for i in range(n_units):
        if rng.random() < p:
            copy[i] = random_unit(rng, lang)
    sep = " " if lang == "en" else ""
    return sep.join(units), sep.join(copy)


def test_minhash_lsh_s_curve_on_planted_pairs():
    rng = random.Random(0)
    bands, rows = 14, 8  # FineWeb's defaults, the ones prepare_data.py uses
    docs, truth = [], []
    for lang in ("en", "ja"):
        for _ in range(600):
            a, b = planted_pair(rng, lang)
            sa, sb = dedup.shingles(a), dedup.shingles(b)
            truth.append((lang, len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))))
            docs += [sa, sb]
    labels = dedup.duplicate_clusters(dedup.lsh_band_hashes(dedup.minhash(docs, bands * rows), bands, rows))
    merged = labels[0::2] == labels[1::2]
    assert len(np.unique(labels)) >= len(truth)  # no pair was merged with another pair
    s = np.array([j for _, j in truth])
    print("\nJaccard bucket   pairs  merged  1-(1-s^r)^b at the bucket mean")
    for lo in np.arange(0, 1.0, 0.1):
        inside = (s >= lo) & (s < lo + 0.1 if lo < 0.9 else s <= 1.0)
        if inside.any():
            expected = 1 - (1 - s[inside] ** rows) ** bands
            print(f"  [{lo:.1f}, {lo + 0.1:.1f})  {inside.sum():6d}  {merged[inside].mean():6.3f}  "
                  f"{expected.mean():6.3f}")
    # with a Jaccard threshold on the candidates' signatures, the tail of the S-curve below it is cut
    sigs = dedup.minhash(docs, bands * rows)
    strict = dedup.duplicate_clusters(dedup.lsh_band_hashes(sigs, bands, rows), sigs, threshold=0.8)
    strict = strict[0::2] == strict[1::2]
    print(f"threshold 0.8: merged {strict[s < 0.7].mean():.3f} below Jaccard 0.7, {strict[s >= 0.9].mean():.3f} "
          f"at >= 0.9")
    assert strict[s < 0.7].mean() < 0.005 and strict[s >= 0.9].mean() >= 0.95
    for lang in ("en", "ja"):
        mine = np.array([t[0] == lang for t in truth])
        high, low = mine & (s >= 0.85), mine & (s <= 0.4)
        assert high.sum() >= 100 and low.sum() >= 100, (lang, high.sum(), low.sum())
        assert merged[high].mean() >= 0.95, f"{lang}: recall {merged[high].mean():.3f} at Jaccard >= 0.85"
        assert merged[low].mean() <= 0.01, f"{lang}: {merged[low].mean():.3f} merged at Jaccard <= 0.4"


def test_exact_duplicates_always_collide():
    text = "\n\n".join(EN[:3])
    variant = "  " + text.upper().replace(" ", "   ") + "\n"
    assert dedup.exact_hash(text) == dedup.exact_hash(variant)
    assert dedup.exact_hash(text) != dedup.exact_hash(text + " more")
    sigs = dedup.minhash([dedup.shingles(t) for t in [text, variant, "\n\n".join(JA[:2])]])
    labels = dedup.duplicate_clusters(dedup.lsh_band_hashes(sigs))
    assert labels.tolist() == [0, 0, 2]


def test_union_find_matches_a_reference():
    rng = np.random.default_rng(0)
    for n, m in [(1, 0), (10, 0), (50, 30), (500, 400), (2000, 100)]:
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        parent = list(range(n))  # the textbook version with path halving
        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = find(x), find(y)
            parent[max(rx, ry)] = min(rx, ry)
        expected = [min(i for i in range(n) if find(i) == find(j)) for j in range(n)] if n <= 500 else None
        labels = dedup.union_find(n, a, b)
        if expected is not None:
            assert labels.tolist() == expected
        assert all(labels[x] == labels[y] for x, y in zip(a, b))
    chain = dedup.union_find(10_000, np.arange(9_999, 0, -1), np.arange(9_998, -1, -1))  # a long chain, reversed
    assert (chain == 0).all()


def test_knowledge_frequency_counts_copies_once():
    fact = "タヌキはため糞と呼ばれる習性を持ち、決まった場所に糞をする。"
    copies = [JA[1] + fact + JA[2]] * 3 + [JA[1] + fact + JA[2] + "。"]
    others = [JA[5] + "タヌキの話。" + JA[6] + "ため糞" , JA[7] + "ため糞をするのはタヌキだけではない。" + JA[8]]
    result = dedup.knowledge_frequency(copies + others + EN, ["タヌキ", "ため糞"], window=50)
    assert result["documents"] == 5 and result["distinct"] == 2, result


def test_repeated_line_counts_are_exact_in_bounded_memory(tmp_path):
    """The boilerplate-line counter counts exactly, holding about its memory budget however many lines go through it
    (the spill to disk is what grows): 50,000 documents x 30 never-repeated lines plus 40 lines of site chrome, each
    in 312 or 313 documents, through a 256 KB budget. Every chrome line is found and no other line (a fixed-size
    count-min sketch flagged 27% of never-repeated lines at 14M documents and 99.99% at 20M)."""
    import tracemalloc
    chrome = np.random.default_rng(0).integers(0, 2**63, 40, dtype=np.uint64)

    def documents():
        rng = np.random.default_rng(1)
        for i in range(50_000):
            lines = rng.integers(0, 2**63, 30, dtype=np.uint64)
            yield np.unique(np.append(lines, chrome[i // 4 % 40]) if i % 4 == 0 else lines)

    tracemalloc.start()
    found, n_lines = dedup.repeated_hashes(documents(), 100, str(tmp_path / "spill"), 1 << 18)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n_lines == 50_000 * 30 + 12_500
    assert np.array_equal(found, np.sort(chrome))
    assert peak < 3 << 20, peak  # the lines are 12 MB: a count held in memory would hold them all
    assert not os.path.exists(tmp_path / "spill")  # the spill files are gone


def test_repeated_line_counts_split_a_partition_too_large_for_memory(tmp_path):
    """A partition over the budget is split again by the next 8 bits, down to one hash per file; the counts stay
    exact: lines in exactly 99 and 100 documents, one line in 5,000 documents, through a 4 KB budget."""
    rng = np.random.default_rng(2)
    at_99, at_100, everywhere = rng.integers(0, 2**63, 3, dtype=np.uint64)
    docs = [np.unique(np.append(rng.integers(0, 2**63, 3, dtype=np.uint64), everywhere)) for _ in range(5000)]
    docs += [np.array([at_99])] * 99 + [np.array([at_100])] * 100
    stale = tmp_path / "spill" / "part_56_000.u64.d"  # a kill -9 mid-count left a split partition behind
    stale.mkdir(parents=True)
    (stale / "part_48_007.u64").write_bytes(np.array([at_99] * 500, np.uint64).tobytes())
    found, n_lines = dedup.repeated_hashes(iter(docs), 100, str(tmp_path / "spill"), 4096)
    assert found.tolist() == sorted([int(at_100), int(everywhere)]) and n_lines == 5000 * 4 + 199


def reference_edges(rows):
    """(head, other) pairs from a dict of key -> values: the smallest value of each key to each other value."""
    groups = {}
    for k, v in rows.tolist():
        groups.setdefault(k, []).append(v)
    return sorted((min(vs), v) for vs in groups.values() for v in vs if v != min(vs))


def test_grouping_in_bounded_memory_equals_a_dict(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**64, 3000, dtype=np.uint64)[rng.integers(0, 3000, 20_000)]  # groups of ~7
    keys[:700] = np.uint64(0xDEADBEEF12345678)  # one key more frequent than memory holds: comes in pieces
    rows = np.stack([keys, rng.permutation(20_000).astype(np.uint64)], axis=1)
    chunks = np.array_split(rows, 37)
    groups = list(dedup.spill_groups(iter(chunks), 2, str(tmp_path / "spill"), memory_bytes=16 << 10))
    assert any(head is not None for _, head in groups)  # the frequent key was split on every bit
    heads, others = dedup.star_edges(groups)
    assert sorted(zip(heads.tolist(), others.tolist())) == reference_edges(rows)
    assert not os.path.exists(tmp_path / "spill")  # the spill files are gone


def test_exact_dedup_of_2m_documents_stays_within_its_memory(tmp_path):
    """(hash, id) rows of 2M documents (a 10% of them copies): 32 MB of rows grouped with an 8 MB budget."""
    budget, n = 8 << 20, 2_000_000

    def rows():  # made in pieces: only what the grouping holds is measured
        rng = np.random.default_rng(1)
        for lo in range(0, n, 10_000):
            h = rng.integers(0, 2**64, 10_000, dtype=np.uint64)
            h[::10] = h[1::10]  # every 10th document copies its neighbour
            yield np.stack([h, np.arange(lo, lo + 10_000, dtype=np.uint64)], axis=1)
    tracemalloc.start()
    _, copies = dedup.star_edges(dedup.spill_groups(rows(), 2, str(tmp_path / "spill"), budget))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(np.sort(copies), np.arange(1, n, 10, dtype=np.uint64))  # the later of each pair
    # the budget, plus the result (3.2 MB: 200k copies, as (head, other) pairs) and one piece of input (0.5 MB)
    assert peak < budget + (4 << 20), f"peak {peak / 2**20:.1f} MB over the {budget >> 20} MB budget"


def union_find_labels(n, a, b):
    return dedup.union_find(n, np.asarray(a, np.int64), np.asarray(b, np.int64))


def test_components_equal_union_find_on_one_rank():
    rng = np.random.default_rng(2)
    n = 5000
    a, b = rng.integers(0, n, 3000), rng.integers(0, n, 3000)
    chain = np.arange(1000, 1999)  # a long path, reversed: pointer jumping keeps the rounds few
    a, b = np.concatenate([a, chain[::-1] + 1]), np.concatenate([b, chain[::-1]])
    nodes, labels, rounds = dedup.components(a.astype(np.uint64), b.astype(np.uint64), lambda ids: np.zeros(len(ids),
                                                                                                              int))
    expected = union_find_labels(n, a, b)
    assert np.array_equal(labels, expected[nodes.astype(np.int64)]) and rounds <= 20
    assert set(nodes.tolist()) == set(a.tolist()) | set(b.tolist())


def test_components_across_two_ranks_equal_union_find(tmp_path):
    """Each rank holds half of the edges; node i is owned by rank i % 2; the labels both ranks return, joined, are
    union-find's."""
    script = tmp_path / "components.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import numpy as np
        import torch.distributed as dist
        sys.path.insert(0, {ROOT!r})
        import dedup
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        rng = np.random.default_rng(3)
        a, b = rng.integers(0, 4000, 2500), rng.integers(0, 4000, 2500)
        a, b = np.concatenate([a, np.arange(3000, 3999)]), np.concatenate([b, np.arange(3001, 4000)])  # a path
        mine = slice(rank, None, 2)
        nodes, labels, rounds = dedup.components(a[mine].astype(np.uint64), b[mine].astype(np.uint64),
                                                 lambda ids: (ids % 2).astype(np.int64))
        assert (nodes % 2 == rank).all()
        expected = dedup.union_find(4000, a, b)
        assert np.array_equal(labels, expected[nodes.astype(np.int64)]), rank
        every = dedup.all_gather_rows(nodes.reshape(-1, 1))[:, 0]
        assert set(every.tolist()) == set(a.tolist()) | set(b.tolist())
        print(f"rank {{rank}} ok in {{rounds}} rounds", flush=True)
        dist.destroy_process_group()
    """))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout
