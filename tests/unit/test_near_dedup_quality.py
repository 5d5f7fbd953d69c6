"""Near-duplicate detection against the truth: documents with planted near copies of known
Jaccard similarity (words replaced and deleted at several rates). hvdllm's recall and precision
against exact Jaccard at the threshold are at least those of datasketch's MinHashLSH with the
same number of permutations and the same shingles (datasketch is a test-only dependency)."""

import json
import random
import re

import numpy as np
from datasketch import MinHash, MinHashLSH
from helpers.corpus import hvdllm_mpi

from hvdllm.data import ShardedSamples

THRESHOLD, PERMUTATIONS, SHINGLE = 0.8, 128, 5
RATES = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)  # J about 0.95, 0.9, 0.82, 0.75, 0.63, 0.4


def shingles(text):
    words = re.findall(r"\w+", text.casefold())
    return {" ".join(words[i:i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}


def planted_corpus(rng, originals=40, words=300):
    vocabulary = [f"w{i}" for i in range(20000)]
    docs = []
    for o in range(originals):
        base = [rng.choice(vocabulary) for _ in range(words)]
        docs.append(base)
        for rate in rng.sample(RATES, 3):
            copy = list(base)
            for _ in range(max(1, round(rate * words))):
                at = rng.randrange(len(copy))
                if rng.random() < 0.5:
                    copy[at] = rng.choice(vocabulary)
                else:
                    del copy[at]
            docs.append(copy)
    rng.shuffle(docs)
    return [f"doc{i:04d} " + " ".join(d) for i, d in enumerate(docs)]


def truly_near_an_earlier(texts):
    sets = [shingles(t) for t in texts]
    return {j for j in range(len(texts))
            if any(len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= THRESHOLD for i in range(j))}


def datasketch_finds(texts):
    lsh, found = MinHashLSH(threshold=THRESHOLD, num_perm=PERMUTATIONS), set()
    for j, text in enumerate(texts):
        m = MinHash(num_perm=PERMUTATIONS, seed=1)
        m.update_batch([s.encode() for s in shingles(text)])
        if lsh.query(m):
            found.add(j)
        lsh.insert(str(j), m)
    return found


def hvdllm_finds(tmp_path, texts):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    third = -(-len(texts) // 3)
    for part in range(3):  # spread over the ranks, in order
        with open(corpus / f"part{part}.jsonl", "w") as f:
            for text in texts[part * third:(part + 1) * third]:
                f.write(json.dumps({"text": text}) + "\n")
    run = hvdllm_mpi(2, "prepare", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "byte",
                     "--seq-len", "8", "--val-fraction", "0", "--near-dup-threshold", str(THRESHOLD),
                     "--num-perm", str(PERMUTATIONS), "--shingle", str(SHINGLE))
    assert run.returncode == 0, run.stderr
    samples = ShardedSamples(tmp_path / "out", "train")
    stream = samples.rows(np.arange(len(samples)))[0].ravel()
    samples.close()
    kept = {int(m) for m in re.findall(rb"doc(\d{4}) ", bytes(stream[stream < 256].astype(np.uint8)))}
    return set(range(len(texts))) - kept


def test_near_duplicate_recall_and_precision_at_least_datasketch_s(tmp_path):
    texts = planted_corpus(random.Random(11))
    truth = truly_near_an_earlier(texts)
    assert 0.3 * len(texts) < len(truth) < 0.9 * len(texts)  # a test with both kinds in it
    ours, theirs = hvdllm_finds(tmp_path, texts), datasketch_finds(texts)

    def quality(found):
        hits = len(found & truth)
        return hits / len(truth), hits / max(1, len(found))

    (our_recall, our_precision), (their_recall, their_precision) = quality(ours), quality(theirs)
    print(f"hvdllm recall {our_recall:.3f} precision {our_precision:.3f}; "
          f"datasketch recall {their_recall:.3f} precision {their_precision:.3f}")
    assert our_recall >= their_recall and our_precision >= their_precision
