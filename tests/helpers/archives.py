"""Archives with a known truth: a small Llama-shaped base model, its protocols, random measured architectures."""

from __future__ import annotations

from archopt.archdb import Archive
from archopt.archdb.arch import BaseSpec
from archopt.archdb.protocol import Protocol
from archopt.archdb.records import ArchRecord, BaseModelInfo, ValueRecord
from archopt.archdb.store import ingest_records

from .synthetic import SyntheticTruth, random_archive

SPEC = BaseSpec(family="llama", num_layers=12, hidden_size=96, num_heads=6, num_kv_heads=3, head_dim=16,
                intermediate_size=256, vocab_size=500)
PPL = Protocol(dataset="wikitext-2-raw-v1", split="test", joining="\n\n", tokenizer="synthetic", seq_len=128,
               tokens=8192)
MMLU = Protocol(dataset="mmlu", split="test", tokenizer="synthetic", shots=5, questions=570)
TRUTH = SyntheticTruth(noise=0.01, seed=1)


def fill(archive: Archive, n: int, seed: int = 0, model: str = "synth", spec: BaseSpec = SPEC) -> list:
    """``n`` random measured architectures; the noise depends on ``seed`` only (not on test order)."""
    batch = random_archive(spec, n, seed)
    truth = SyntheticTruth(noise=TRUTH.noise, seed=seed + 1)
    ppl, mmlu = truth.ppl(batch, noisy=True), truth.mmlu(batch, noisy=True)
    info = BaseModelInfo(model, spec, f"hash-{model}")
    records = [ArchRecord(model=model, base=info, architecture=a.layer_dicts(), origin="random",
                          values=(ValueRecord("ppl_wikitext2", float(p), PPL),
                                  ValueRecord("mmlu", float(min(1.0, max(0.0, q))), MMLU)))
               for a, p, q in zip(batch.architectures(), ppl, mmlu)]
    with archive.write() as session:
        ingest_records(session, records)
    return batch.architectures()


def record_ppl(archive: Archive, archs, values, protocol: Protocol = PPL, origin: str = "verify",
               model: str = "synth", spec: BaseSpec = SPEC) -> None:
    """Store one ``ppl_wikitext2`` value per architecture under ``protocol`` (a test's measurement)."""
    info = BaseModelInfo(model, spec, f"hash-{model}")
    records = [ArchRecord(model=model, base=info, architecture=a.layer_dicts(), origin=origin,
                          values=(ValueRecord("ppl_wikitext2", float(v), protocol),)) for a, v in zip(archs, values)]
    with archive.write() as session:
        ingest_records(session, records)
