"""Launch parameters of the ``wq_linear`` kernels: a small table keyed by (kind, M bucket, N, K).

The table (``wq_configs.json`` beside this file) is written by
``benchmarks/gpu_wq_sweep.py`` on a GPU: for each weight kind, row bucket
and projection shape it times a few hundred candidate launches and keeps
the fastest that matched the float32 reference. A shape the table does not
hold takes the nearest entry of its kind and bucket (shapes within 4x in N
and K; launch parameters are re-checked against the weight, see
``kernels/wq_linear.py``), else the defaults below, which follow the same
reasoning the sweep measures:

- one row: the FMA GEMV (no tensor cores: the packed words are the bytes to
  move), 32 outputs per program, K split until the grid has about two
  programs per SM of an H100 (132 SMs);
- 2-32 rows: the weight tile dequantized once and multiplied on the tensor
  cores with the rows as the narrow side of the MMA (``swap_ab``), so the
  same weight stream serves every row;
- more rows: tiled GEMM, 64-128 rows per tile; from 1,024 rows the whole
  weight is dequantized to a bf16 scratch and cuBLAS multiplies (its bytes,
  2 x K x N x 2 written and read, cost less than re-dequantizing the tile
  for each block of rows).

Loaded once at import into a frozen mapping. Only a benchmark comparing
tables swaps it (:func:`use_table`, before any launch); the engine reads the
committed file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType

PATHS = ("gemv", "mm", "dequant")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TABLE_PATH = Path(__file__).with_name("wq_configs.json")
SMS = 132  # an H100's SMs: the defaults aim at two programs per SM
NEAREST_LOG2_DISTANCE = 2.0  # a nearest entry serves shapes within 4x in N and in K


@dataclass(frozen=True)
class WQConfig:
    """One launch of ``wq_linear``: which kernel and its tile (see kernels/wq_linear.py)."""

    path: str  # "gemv" (FMA, one row), "mm" (tl.dot on dequantized tiles), "dequant" (bf16 scratch + cuBLAS)
    block_m: int = 16
    block_n: int = 32
    block_kw: int = 16  # packed int32 words along K per loop step (x 32/bits input features)
    split_k: int = 1
    swap_ab: bool = False  # mm: the weight tile is the MMA's M side, the rows its N side
    post_scale: bool = True  # mm: scale after the dot when the tile lies in one group
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"wq config path {self.path!r} is not one of {PATHS}")
        for name in ("block_m", "block_n", "block_kw", "num_warps"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1):
                raise ValueError(f"wq config {name}={v} must be a positive power of two")
        if self.split_k < 1 or self.num_stages < 1:
            raise ValueError("wq config split_k and num_stages must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> WQConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"wq config keys {unknown} are unknown (known: {sorted(known)})")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def kind_of(bits: int, group: int, super_scales: bool, mins: bool, g_idx: bool) -> str:
    """The table's name for a weight's kernel specialization, e.g. ``w4g128`` (AWQ/GPTQ) or ``w4g32km`` (Q4_K)."""
    return f"w{bits}g{group}" + ("k" if super_scales else "") + ("m" if mins else "") + ("a" if g_idx else "")


def m_bucket(m: int) -> int:
    """The smallest bucket holding ``m`` rows (the last bucket holds everything above it)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def default_config(kind: str, m: int, n: int, k: int) -> WQConfig:
    """The launch used when the table has nothing near (see the module docstring)."""
    bits = int(kind[1 : kind.index("g")])
    pack = 32 // bits
    kw = max(1, k // pack)
    if m == 1:
        block_n, block_kw = 32, 32 if bits == 4 else 16
        return WQConfig("gemv", block_n=block_n, block_kw=block_kw, split_k=_split(n, block_n, kw, block_kw),
                        num_warps=4, num_stages=3)
    if m <= 32:
        block_m, block_n, block_kw = max(16, 1 << (m - 1).bit_length()), 64, 16
        return WQConfig("mm", block_m=block_m, block_n=block_n, block_kw=block_kw, swap_ab=True,
                        split_k=_split(n, block_n, kw, block_kw), num_warps=4, num_stages=3)
    if m < 1024:
        block_m = 64 if m <= 64 else 128
        return WQConfig("mm", block_m=block_m, block_n=128, block_kw=16, num_warps=4 if block_m == 64 else 8,
                        num_stages=3)
    return WQConfig("dequant", block_n=64, block_kw=16, num_warps=4, num_stages=2)


def _split(n: int, block_n: int, kw: int, block_kw: int) -> int:
    """K splits (a power of two) until ~2 programs per SM, each split keeping at least 4 loop steps."""
    tiles = -(-n // block_n)
    split = 1
    while tiles * split < 2 * SMS and kw // (2 * split) >= 4 * block_kw:
        split *= 2
    return split


@dataclass(frozen=True)
class _Entry:
    n: int
    k: int
    config: WQConfig


def load_table(path: Path = TABLE_PATH) -> MappingProxyType:
    """``{(kind, m_bucket): (entries...)}`` from a sweep's JSON (empty when the file is absent)."""
    if not path.exists():
        return MappingProxyType({})
    data = json.loads(path.read_text())
    table: dict[tuple[str, int], list[_Entry]] = {}
    for e in data.get("entries", []):
        key = (str(e["kind"]), int(e["m"]))
        if key[1] not in M_BUCKETS:
            raise ValueError(f"{path}: m bucket {key[1]} is not one of {M_BUCKETS}")
        table.setdefault(key, []).append(_Entry(int(e["n"]), int(e["k"]), WQConfig.from_dict(e["config"])))
    return MappingProxyType({key: tuple(v) for key, v in table.items()})


TABLE = load_table()


def use_table(path: Path | str) -> MappingProxyType:
    """Make the sweep output at ``path`` the table every later lookup reads (benchmarks: a new table, no commit)."""
    global TABLE
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"wq config table {path} does not exist")
    TABLE = load_table(path)
    return TABLE


def lookup(kind: str, m: int, n: int, k: int, table: MappingProxyType | None = None) -> WQConfig:
    """The table's config for this launch: exact shape, else the nearest of its kind and bucket, else the default."""
    entries = (TABLE if table is None else table).get((kind, m_bucket(m)), ())
    best, best_d = None, NEAREST_LOG2_DISTANCE
    for e in entries:
        if e.n == n and e.k == k:
            return e.config
        d = abs(math.log2(e.n / n)) + abs(math.log2(e.k / k))
        if d <= best_d:
            best, best_d = e.config, d
    return best if best is not None else default_config(kind, m, n, k)


__all__ = ["M_BUCKETS", "PATHS", "TABLE", "TABLE_PATH", "WQConfig", "default_config", "kind_of", "load_table",
           "lookup", "m_bucket", "use_table"]
