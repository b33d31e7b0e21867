"""Schemathesis hooks for ./scripts/konnect-compat.

The public schema leaves some constraints to its prose. Valid ("positive") cases that break them
are not generated, because the ledger refuses them with a 400 on purpose; each one is listed here
and in the README. Negative cases are untouched.
"""
from decimal import Decimal, InvalidOperation

import schemathesis


def _decimal(text):
    try:
        return Decimal(text)
    except (InvalidOperation, TypeError):
        return None


@schemathesis.hook
def filter_body(ctx, body):
    """Credit amounts: a grant adds credit (amount > 0; the cost basis is documented as > 0), an
    adjustment corrects by a non-zero amount."""
    if not isinstance(body, dict):
        return True
    op = ctx.operation.definition.raw.get("operationId") if ctx.operation else None
    amount = _decimal(body.get("amount"))
    if op == "create-credit-grant":
        basis = (body.get("purchase") or {}).get("per_unit_cost_basis") if isinstance(body.get("purchase"), dict) else None
        if amount is not None and amount <= 0:
            return False
        if basis is not None and (_decimal(basis) is None or _decimal(basis) <= 0):
            return False
    if op == "create-credit-adjustment" and amount is not None and amount == 0:
        return False
    return True
