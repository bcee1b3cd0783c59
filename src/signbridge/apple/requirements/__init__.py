"""Code requirements: Apple's expression language in binary form (:mod:`.binary`: the expression
tree, requirement and requirement-set blobs), in text form (:mod:`.text`: parsing what ``-R``
takes, rendering what ``-r-`` prints) and evaluated against signed code (:mod:`.evaluation`).

The names the rest of signbridge uses are re-exported here.
"""

from .binary import (
    ANCHOR_CERT,
    EMPTY_REQUIREMENT_SET,
    LEAF_CERT,
    MAX_EXPRESSION_DEPTH,
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
    encode_requirement,
    encode_requirement_set,
    identifier,
    oid_from_der,
    oid_to_der,
    parse_requirement,
    parse_requirement_set,
)
from .evaluation import RequirementContext, certificate_sha1, evaluate
from .text import (
    RequirementSyntaxError,
    load_requirement,
    parse_requirement_text,
    render,
    requirement_set_lines,
)

__all__ = [
    "ANCHOR_CERT",
    "EMPTY_REQUIREMENT_SET",
    "LEAF_CERT",
    "MAX_EXPRESSION_DEPTH",
    "OID_DEVELOPER_ID_CA",
    "OID_DEVELOPER_ID_LEAF",
    "Expr",
    "Match",
    "MatchOp",
    "Op",
    "RequirementContext",
    "RequirementSyntaxError",
    "RequirementType",
    "anchor_apple_generic",
    "cdhash",
    "certificate_field",
    "certificate_generic",
    "certificate_sha1",
    "encode_requirement",
    "encode_requirement_set",
    "evaluate",
    "identifier",
    "oid_from_der",
    "oid_to_der",
    "load_requirement",
    "parse_requirement",
    "parse_requirement_set",
    "parse_requirement_text",
    "render",
    "requirement_set_lines",
]
