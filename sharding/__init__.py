"""Mesh construction and the logical-axis sharding rules. Mesh axis names live only here."""

from sharding.mesh import MESH_AXES, make_mesh
from sharding.rules import LOGICAL_RULES, constrain, describe_rules, logical_sharding, logical_spec

__all__ = ["MESH_AXES", "make_mesh", "LOGICAL_RULES", "constrain", "describe_rules", "logical_sharding", "logical_spec"]
