"""Code requirements: Apple's expression language in binary form (:mod:`.binary`: the expression
tree, requirement and requirement-set blobs), in text form (:mod:`.text`: parsing what ``-R``
takes, rendering what ``-r-`` prints) and evaluated against signed code (:mod:`.evaluation`).

This ``__init__`` imports nothing: a reader of requirements does not load their evaluation.
"""
