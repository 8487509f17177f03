"""Secret masking: rules written from issuers' token formats, a same-length masking engine."""

from proxy.masking.builtin import builtin_rules
from proxy.masking.engine import Masker, MaskResult, MaskStream, Span, hyperscan_available
from proxy.masking.rules import Rule, RuleError, select_rules

__all__ = [
    "MaskResult",
    "MaskStream",
    "Masker",
    "Rule",
    "RuleError",
    "Span",
    "builtin_rules",
    "hyperscan_available",
    "select_rules",
]
