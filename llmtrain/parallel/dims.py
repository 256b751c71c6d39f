"""ParallelDims: the one owner of the rank topology (docs/architecture.md).

World = pp x dp_replicate x dp_shard x cp x tp, in that mesh order (tp innermost so that tensor-parallel
peers are neighbours, i.e. on the same node; context-parallel peers next, since they exchange K/V in
every attention layer). Meshes are returned to callers, never kept in globals.
Expert parallelism is carved from the data-parallel ranks: the flattened dp mesh is unflattened into
(edp, ep), ep innermost, so an expert-parallel group is `ep` consecutive dp ranks and the ranks that
hold the same experts (edp, the expert-data-parallel group) are `ep` apart.
"""

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llmtrain.config.errors import ConfigError
from llmtrain.config.rules import check_parallel_factors

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    """Validated parallel degrees; at most one of dp_replicate/dp_shard may be -1 (fill the world)."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    ep: int = 1
    """Expert-parallel degree, a divisor of dp (checked by llmtrain.parallel.layout)."""
    cp: int = 1
    """Context-parallel degree (llmtrain.parallel.context_parallel): cp ranks share a sample."""
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _dp_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _expert_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _dp_cp_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _shard_cp_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_parallel_factors(dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, tp=self.tp, pp=self.pp)
        if self.cp < 1:
            raise ConfigError(f"parallel.cp={self.cp} must be >= 1")
        fixed = self.cp * self.tp * self.pp * max(self.dp_replicate, 1) * max(self.dp_shard, 1)
        if self.world_size % fixed:
            raise ConfigError(self._mismatch())
        if self.dp_replicate == -1:
            self.dp_replicate = self.world_size // fixed
        if self.dp_shard == -1:
            self.dp_shard = self.world_size // fixed
        if self.dp_replicate < 1 or self.dp_shard < 1:
            raise ConfigError(self._mismatch())
        if self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp != self.world_size:
            raise ConfigError(self._mismatch())

    def _mismatch(self) -> str:
        return (
            f"parallel layout does not fit the world size {self.world_size}: "
            f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x cp={self.cp} x tp={self.tp} "
            f"x pp={self.pp} "
            f"must equal {self.world_size} (-1 = fill)"
        )

    @property
    def dp(self) -> int:
        """Total data-parallel degree: how many different batches are processed at once."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: the dp ranks that hold the same experts (dp / ep)."""
        return self.dp // self.ep

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def dp_cp(self) -> int:
        """Ranks that average weight gradients: the dp replicas times the cp ranks of each (a cp rank
        holds the same weights and a part of the sample, so for weight gradients it is a dp rank)."""
        return self.dp * self.cp

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """World mesh with named dims plus flattened views: `dp` (replicate x shard) for data loading
        and loss reduction, `dp_shard_cp`-style names are not used."""
        if self._mesh is None:
            mesh = init_device_mesh(
                device_type,
                tuple(getattr(self, n) for n in MESH_ORDER),
                mesh_dim_names=MESH_ORDER,
            )
            self._dp_mesh = mesh[("dp_replicate", "dp_shard")]._flatten("dp")
            if self.ep_enabled:
                self._expert_mesh = self._dp_mesh._unflatten(0, (self.edp, self.ep), ("edp", "ep"))
            if self.cp_enabled:
                self._dp_cp_mesh = mesh[("dp_replicate", "dp_shard", "cp")]._flatten("dp_cp")
                self._shard_cp_mesh = mesh[("dp_shard", "cp")]._flatten("dp_shard_cp")
            self._mesh = mesh
        return self._mesh

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The flattened (dp_replicate x dp_shard) mesh: data loading, token counts, loss reduction.
        Kept here because slicing a flattened dim from the root mesh is deprecated in torch."""
        if self._dp_mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() must run before dp_mesh is used")
        return self._dp_mesh

    @property
    def expert_mesh(self) -> DeviceMesh:
        """The (edp, ep) view of the dp ranks (ep > 1 only): experts are sharded over `ep`, their
        gradients reduced (or ZeRO-sharded) over `edp`."""
        if self._expert_mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() with ep > 1 must run before expert_mesh is used")
        return self._expert_mesh

    @property
    def dp_cp_mesh(self) -> DeviceMesh:
        """The flattened (dp_replicate x dp_shard x cp) mesh: gradient averaging, token counts and the
        loss sum under context parallelism (the dp mesh when cp = 1)."""
        if not self.cp_enabled:
            return self.dp_mesh
        if self._dp_cp_mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() must run before dp_cp_mesh is used")
        return self._dp_cp_mesh

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """What ZeRO/FSDP2 shards over: dp_shard, times cp under context parallelism (a cp rank holds
        the same weights, so it can hold a shard of them: torchtitan's dp_shard_cp)."""
        assert self._mesh is not None, "ParallelDims.build_mesh() must run first"
        return self._shard_cp_mesh if self._shard_cp_mesh is not None else self._mesh["dp_shard"]

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of a global rank along each mesh dim (pure arithmetic, no process group)."""
        out: dict[str, int] = {}
        for name in reversed(MESH_ORDER):
            size = getattr(self, name)
            out[name] = rank % size
            rank //= size
        out["dp"] = out["dp_replicate"] * self.dp_shard + out["dp_shard"]
        if self.ep_enabled:
            out["ep"], out["edp"] = out["dp"] % self.ep, out["dp"] // self.ep
        return out

    def describe(self) -> str:
        ep = f" ep={self.ep}" if self.ep_enabled else ""
        cp = f" cp={self.cp}" if self.cp_enabled else ""
        return f"dp_replicate={self.dp_replicate} dp_shard={self.dp_shard}{cp} tp={self.tp} pp={self.pp}{ep}"
