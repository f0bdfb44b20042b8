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
    ref = np.asarray(ref, dtype=np.float32)
    art = np.asarray(art, dtype=np.float32)
    if ref.shape != art.shape:
        raise ValueError(f"logits shapes differ: {ref.shape} vs {art.shape}")
    kl = kl_per_position(ref, art)
    d = art - ref
    return {
        "positions": int(ref.shape[0]),
        "rel_err": float(np.linalg.norm(d) / np.linalg.norm(ref)),
        "max_abs_err": float(np.abs(d).max()),
        "top1_agreement": float((ref.argmax(-1) == art.argmax(-1)).mean()),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
    }


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
