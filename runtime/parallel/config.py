"""How one engine splits over ranks: sequence parallelism (each rank holds 1/sp of every row's
tokens) times CFG parallelism (each rank runs one guidance branch's rows). Pure: no torch.

Ranks are numbered cfg-major: rank = branch * sp + shard, so the `sp` ranks of one branch are
consecutive (one node's GPUs share the heavy attention all-to-all; the branch exchange is once per
pass)."""

from __future__ import annotations

from dataclasses import dataclass

from sencache.runtime.errors import BadInput

AXES = ("sp", "cfg")


@dataclass(frozen=True)
class ParallelConfig:
    """sp x cfg ranks for one engine."""

    sp: int = 1
    cfg: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.sp, int) or isinstance(self.sp, bool) or self.sp < 1:
            raise BadInput(f"parallel sp must be an integer >= 1, got {self.sp!r}", param="parallel")
        if self.cfg not in (1, 2) or isinstance(self.cfg, bool):
            raise BadInput(f"parallel cfg must be 1 or 2 (two guidance branches), got {self.cfg!r}", param="parallel")

    @classmethod
    def parse(cls, value: str | ParallelConfig | None) -> ParallelConfig:
        """`value` as a config: "sp=2,cfg=2" (either axis may be left out; "" or None: one rank)."""
        if value is None or isinstance(value, ParallelConfig):
            return value or cls()
        if not isinstance(value, str):
            raise BadInput(f"parallel must be text like 'sp=2,cfg=2', got {type(value).__name__}", param="parallel")
        degrees: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, _, number = part.partition("=")
            name = name.strip()
            if name not in AXES or name in degrees or not number.strip().isdigit():
                raise BadInput(
                    f"parallel must be like 'sp=2,cfg=2' (axes {', '.join(AXES)}, each once), got {value!r}",
                    param="parallel",
                )
            degrees[name] = int(number)
        return cls(**degrees)

    @property
    def world(self) -> int:
        """The number of ranks."""
        return self.sp * self.cfg

    def branch(self, rank: int) -> int:
        """The guidance branch rank `rank` runs (0: conditional, 1: unconditional; 0 without cfg)."""
        return rank // self.sp

    def shard(self, rank: int) -> int:
        """Which 1/sp of the tokens rank `rank` holds."""
        return rank % self.sp

    def __str__(self) -> str:
        return f"sp={self.sp},cfg={self.cfg}"


def split(count: int, parts: int, index: int) -> slice:
    """Part `index` of `count` items cut into `parts` nearly equal consecutive parts."""
    base, extra = divmod(count, parts)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))
