"""Agreement metrics between reference logits / embeddings and an artifact's."""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl_per_position(ref: np.ndarray, art: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_art) at each position, in nats."""
    lp, lq = log_softmax(ref), log_softmax(art)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def logits_agreement(ref: np.ndarray, art: np.ndarray) -> dict[str, float]:
    """positions, rel_err, max_abs_err, top1_agreement, kl_mean / kl_p99 / kl_max, cosine."""
    return compare_logits(ref, art)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def embedding_agreement(ref: np.ndarray, art: np.ndarray) -> dict[str, float]:
    ref = np.asarray(ref, dtype=np.float32)
    art = np.asarray(art, dtype=np.float32)
    if ref.shape != art.shape:
        raise ValueError(f"embedding shapes differ: {ref.shape} vs {art.shape}")
    rows = [cosine(r, a) for r, a in zip(ref, art)]
    return {"tokens": int(ref.shape[0]), "cosine": cosine(ref, art), "min_row_cosine": float(min(rows)),
            "rel_err": float(np.linalg.norm(art - ref) / np.linalg.norm(ref))}


KL_ROWS = 8


def compare_logits(ref: np.ndarray, art: np.ndarray, chunk: int = 64) -> tuple[dict[str, float], dict[str, list]]:
    """`logits_agreement` plus the logits' cosine, computed `chunk` rows at a time (a 248k-entry
    vocabulary makes whole-prompt float64 softmaxes gigabytes), and per-position series: KL,
    the reference's top-1 margin (top-1 minus top-2 logit), whether the top-1 tokens agree, and
    the logit error's scale (RMS over the vocabulary of the difference less its mean: softmax
    ignores a shift of every logit, so only this part can move probabilities or the top-1)."""
    if ref.shape != art.shape:
        raise ValueError(f"logits shapes differ: {ref.shape} vs {art.shape}")
    n = ref.shape[0]
    kl = np.empty(n)
    margin = np.empty(n)
    match = np.empty(n, dtype=bool)
    err = np.empty(n)
    dd = rr = aa = ra = 0.0
    max_abs = 0.0
    for s in range(0, n, chunk):
        r = np.asarray(ref[s:s + chunk], dtype=np.float32)
        a = np.asarray(art[s:s + chunk], dtype=np.float32)
        for k in range(0, len(r), KL_ROWS):  # row by row the same numbers, an eighth of the float64 temporaries
            kl[s + k:s + min(k + KL_ROWS, len(r))] = kl_per_position(r[k:k + KL_ROWS], a[k:k + KL_ROWS])
        top2 = np.partition(r, -2, axis=-1)[:, -2:]
        margin[s:s + len(r)] = top2[:, 1] - top2[:, 0]
        match[s:s + len(r)] = r.argmax(-1) == a.argmax(-1)
        d = (a - r).astype(np.float64)
        err[s:s + len(r)] = d.std(-1) if d.size else 0.0
        dd += float((d * d).sum())
        rr += float((r.astype(np.float64) ** 2).sum())
        aa += float((a.astype(np.float64) ** 2).sum())
        ra += float((r.astype(np.float64) * a).sum())
        max_abs = max(max_abs, float(np.abs(d).max()) if d.size else 0.0)
    summary = {
        "positions": int(n),
        "kl_mean": float(kl.mean()) if n else 0.0,
        "kl_p99": float(np.percentile(kl, 99)) if n else 0.0,
        "kl_max": float(kl.max()) if n else 0.0,
        "top1_agreement": float(match.mean()) if n else 1.0,
        "rel_err": float(np.sqrt(dd / rr)) if rr else 0.0,
        "max_abs_err": max_abs,
        "cosine": float(ra / np.sqrt(rr * aa)) if rr and aa else 1.0,
    }
    series = {"kl": [float(x) for x in kl], "margin": [float(x) for x in margin], "top1_match": [int(x) for x in match],
              "logit_err": [float(x) for x in err]}
    return summary, series
