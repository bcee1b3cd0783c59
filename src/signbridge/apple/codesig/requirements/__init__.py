"""Code requirements: Apple's expression language in binary form (:mod:`.binary`: the expression
tree, requirement and requirement-set blobs), in text form (:mod:`.text`: parsing what ``-R``
takes, rendering what ``-r-`` prints) and evaluated against signed code (:mod:`.evaluation`).

The names the rest of signbridge uses are re-exported here; the others live in their module.
"""

from .binary import (
    ANCHOR_CERT,
    EMPTY_REQUIREMENT_SET,
    LEAF_CERT,
    OID_DEVELOPER_ID_CA,
    OID_DEVELOPER_ID_LEAF,
    Expr,
    Match,
    MatchOp,
    Op,
    RequirementType,
    anchor_apple_generic,
    cdhash,
    certificate_field,
    certificate_generic,
    encode_requirement_set,
    identifier,
    parse_requirement_set,
)
from .evaluation import RequirementContext, certificate_sha1, evaluate
from .text import (
    load_requirement,
    render,
    requirement_set_lines,
)

__all__ = [
    "ANCHOR_CERT",
    "EMPTY_REQUIREMENT_SET",
    "LEAF_CERT",
    "OID_DEVELOPER_ID_CA",
    "OID_DEVELOPER_ID_LEAF",
    "Expr",
    "Match",
    "MatchOp",
    "Op",
    "RequirementContext",
    "RequirementType",
    "anchor_apple_generic",
    "cdhash",
    "certificate_field",
    "certificate_generic",
    "certificate_sha1",
    "encode_requirement_set",
    "evaluate",
    "identifier",
    "load_requirement",
    "parse_requirement_set",
    "render",
    "requirement_set_lines",
]
