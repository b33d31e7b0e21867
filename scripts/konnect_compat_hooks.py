"""Schemathesis hooks for ./scripts/konnect-compat: the documented exclusions, and nothing else.

Every failure schemathesis finds fails the run except the few below. Each exclusion is narrow: it
names the operations, the failure code, the exact answer the ledger gives (status and the field
its problem names) and a property of the request that makes that answer right, computed here
from the request itself. A failure that differs in any of these is kept. Why each answer is right
is written beside it (and in the README, "Konnect compatibility").

Why `filter_failure` and not a generation filter: schemathesis applies `filter_body` only to the
fuzzing phase (its examples and coverage phases send the schema's examples and boundary values
unfiltered, which is why an earlier version of this file, a `filter_body` hook, did not take
effect), and `filter_case` not to the examples phase. `filter_failure` sees every phase; it also
keeps the requests in the run, so each exclusion checks that the ledger refuses them precisely.
"""
import atexit
import base64
import calendar
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from urllib.parse import parse_qsl, urlsplit

import jsonschema
import schemathesis


def _decimal(text):
    try:
        return Decimal(text)
    except (InvalidOperation, TypeError, ValueError):
        return None


def _problem(response):
    """The problem's `field`, if the answer is a problem+json document."""
    content_type = next((v[0] for k, v in response.headers.items() if k.lower() == "content-type" and v), "")
    if not content_type.startswith("application/problem+json"):
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("field") if isinstance(body, dict) else None


def _operation(case):
    return case.operation.definition.raw.get("operationId")


def _body(case):
    return case.body if isinstance(case.body, dict) else {}


# 1. A grant's amount must be greater than zero. The schema's pattern admits a sign and zero, but
#    Konnect's engine refuses such a grant with a 400 (its credit-grant validation: "amount must
#    be positive"), and a grant that adds no credit or removes credit is not a grant (DESIGN:
#    `amount` > 0; corrections are adjustments).
def _grant_amount_not_positive(case, field):
    amount = _decimal(_body(case).get("amount"))
    return field == "amount" and amount is not None and amount <= 0


# 2. A grant's `purchase.per_unit_cost_basis` must be greater than zero: the schema says so in the
#    field's own description ("The value must be greater than 0"), not in its pattern.
def _cost_basis_not_positive(case, field):
    purchase = _body(case).get("purchase")
    basis = _decimal(purchase.get("per_unit_cost_basis")) if isinstance(purchase, dict) else None
    return field == "purchase.per_unit_cost_basis" and basis is not None and basis <= 0


# 3. `purchase` is "Present when a funding workflow applies (funding_method is not `none`)", says
#    its description: purchase terms without a funding workflow, or a funded grant without them,
#    is refused (Konnect's engine too: "purchase terms are required for funded grants").
def _purchase_mismatch(case, field):
    body = _body(case)
    funded = body.get("funding_method") in ("invoice", "external")
    return field == "purchase" and funded != isinstance(body.get("purchase"), dict)


# 4. Label keys: the `Labels` schema constrains only the values; its description constrains the
#    keys ("Keys must be of length 1-63 characters, and cannot start with kong, konnect, mesh, kic,
#    or _"). The ledger holds keys to that description and names the label at fault.
_RESERVED_PREFIXES = ("kong", "konnect", "mesh", "kic", "_")


def _label_key_invalid(key):
    return not 1 <= len(key) <= 63 or key.lower().startswith(_RESERVED_PREFIXES)


def _bad_label_key(case, field):
    labels = _body(case).get("labels")
    if not isinstance(labels, dict) or not field or not field.startswith("labels."):
        return False
    key = field[len("labels."):]
    return key in labels and _label_key_invalid(key)


# 5. `sort` takes the attributes the operation's description lists. The parameter's schema is the
#    shared free-text `SortQuery` (whose example, `created_at desc`, is no attribute of events);
#    Konnect's engine answers an unsupported attribute with a 400 ("unsupported sort field").
_SORT_ATTRIBUTES = {
    "list-customers": {"id", "name", "created_at"},
    "list-metering-events": {"time", "ingested_at", "stored_at"},
}
_SORT = re.compile(r"^\s*(\S+)(\s+(asc|desc))?\s*$")


def _unsupported_sort(case, field):
    allowed = _SORT_ATTRIBUTES.get(_operation(case))
    sort = (case.query or {}).get("sort")
    if field != "sort" or allowed is None or not isinstance(sort, str):
        return False
    first = sort.split(",")[0] if _operation(case) == "list-metering-events" else sort
    match = _SORT.match(first)
    return match is None or match.group(1) not in allowed


# 6. Money is exact: the ledger never rounds an amount, so it refuses one it cannot hold exactly
#    (rust_decimal's 28 digits; with the ledger's shared limits, more than 10^15 or more than 9
#    decimal places). The schema's pattern admits any number of digits.
_MAX_AMOUNT, _MAX_SCALE = Decimal(10) ** 15, 9


def _amount_out_of_bounds(case, field):
    body = _body(case)
    purchase = body.get("purchase") if isinstance(body.get("purchase"), dict) else {}
    texts = {"amount": body.get("amount"), "purchase.per_unit_cost_basis": purchase.get("per_unit_cost_basis")}
    # "body": the purchase amount (amount x cost basis) cannot be held exactly either.
    named = texts.values() if field == "body" else [texts.get(field)]
    return any(
        (value := _decimal(text)) is not None and (abs(value) > _MAX_AMOUNT or len(text.partition(".")[2]) > _MAX_SCALE)
        for text in named
    )


# 7. `expires_after` is "ISO8601" (no grammar given). A grant's expiry must be an instant the ledger
#    computes exactly: whole years, months, weeks and days (hours, minutes and seconds may have a
#    fraction of up to nine digits; a fraction of a month has no length), more than zero (Konnect's
#    engine: "expires_after must be positive"), at most 10,000 years, and ending by the year 9999
#    (an instant after it has no RFC 3339 form).
_DURATION = re.compile(
    r"^P(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?"
    r"(?:T(?=\d)(?:(\d+(?:\.\d{1,9})?)H)?(?:(\d+(?:\.\d{1,9})?)M)?(?:(\d+(?:\.\d{1,9})?)S)?)?$"
)


def _ends_after_9999(case, months, days, seconds):
    start = _body(case).get("effective_at")
    try:
        start = datetime.fromisoformat(start.replace("Z", "+00:00")) if isinstance(start, str) else datetime.now(timezone.utc)
    except ValueError:
        return False
    month = start.month - 1 + int(months)
    year = start.year + month // 12
    if year > 9999:
        return True
    day = min(start.day, calendar.monthrange(year, month % 12 + 1)[1])
    try:
        start.replace(year=year, month=month % 12 + 1, day=day) + timedelta(days=int(days), seconds=float(seconds))
    except OverflowError:
        return True
    return False


def _duration_not_exact(case, field):
    text = _body(case).get("expires_after")
    if field != "expires_after" or not isinstance(text, str):
        return False
    match = _DURATION.match(text)
    if not match or text == "P":
        return True
    y, mo, w, d, h, mi, sec = (Decimal(g or 0) for g in match.groups())
    seconds = h * 3600 + mi * 60 + sec
    longest = 10_000 * 366
    if y * 12 + mo > 12 * 10_000 or w * 7 + d > longest or seconds > longest * 86_400 or y + mo + w + d + seconds == 0:
        return True
    return _ends_after_9999(case, y * 12 + mo, w * 7 + d, seconds)


# 7b. A metering event's `id` and `source` are its unique key, at most 1,024 bytes each (the schema
#     sets no length; PostgreSQL cannot index a longer key).
def _event_id_too_long(case, field):
    events = case.body if isinstance(case.body, list) else [case.body]
    names = ("id", "source")
    return any(
        isinstance(e, dict) and any(isinstance(e.get(n), str) and len(e[n].encode()) > 1024 for n in names)
        for e in events
    ) and (field or "").split(".")[-1] in names


# 8. Cursors are opaque: `page[after]` and `page[before]` take a cursor this API issued (the
#    item "after this parameter" is one the API named), and not both at once. Konnect's engine
#    answers the same with a 400 ("unable to parse page[after] cursor", "range pagination not
#    supported").
def _issued(cursor):
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return False
    return text.startswith("c1:") and text[3:].isdigit()


def _cursor_not_issued(case, field):
    query = case.query or {}
    given = [query.get(n) for n in ("page[after]", "page[before]") if query.get(n)]
    if field not in ("page[after]", "page[before]"):
        return False
    return len(given) == 2 or not all(isinstance(c, str) and _issued(c) for c in given)


# Schema-valid requests the ledger refuses with a 400 naming `field`, on purpose (ST202).
_REFUSED_ON_PURPOSE = {
    "create-credit-grant": (
        _grant_amount_not_positive,
        _cost_basis_not_positive,
        _purchase_mismatch,
        _bad_label_key,
        _amount_out_of_bounds,
        _duration_not_exact,
    ),
    "create-credit-adjustment": (_bad_label_key, _amount_out_of_bounds),
    "list-credit-transactions": (_cursor_not_issued,),
    "create-customer": (_bad_label_key,),
    "upsert-customer": (_bad_label_key,),
    "list-customers": (_unsupported_sort,),
    "list-metering-events": (_unsupported_sort, _cursor_not_issued),
    "ingest-metering-events": (_event_id_too_long,),
}


# 9. A customer key or subject key that another customer holds is a 409 Conflict, which the schema
#    does not list for create-customer and upsert-customer (ST103, undocumented status). 409 is what
#    Konnect's engine answers (its customer service reports a key conflict, and its API encodes a
#    conflict as 409), what the same schema lists for a grant key that is taken, and what HTTP
#    means by a request that conflicts with the current state; a 400 would call a valid request
#    malformed (and fail schemathesis's own positive-data check, which accepts 409).
_CONFLICT_FIELDS = {"key", "usage_attribution.subject_keys"}


def _key_conflict(case, response, field):
    return (
        _operation(case) in {"create-customer", "upsert-customer"}
        and response.status_code == 409
        and field in _CONFLICT_FIELDS
    )


# 10. A schema-violating query that schemathesis's own serialiser turns into a valid one (ST201):
#     an empty list is not sent at all, a number is sent as its text (valid for a text filter),
#     and an empty filter object `{}` goes out as `filter[x]=`, the same bytes as the empty text
#     it meant as invalid. The ledger answers the query it received; this exclusion re-reads that
#     query from the URL sent and applies only when it validates against the operation's
#     parameter schemas (an empty member counted valid if `""` or `{}` would be).
def _member(params, name, value):
    base, *path = re.findall(r"[^\[\]]+|(?<=\[)(?=\])", name) or [name]
    if not path:
        params[base] = value
        return
    node = params.setdefault(base, {})
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        node[path[-1]] = value


def _coerce(value, schema, spec):
    if isinstance(schema, dict) and "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "integer" and isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: _coerce(v, props.get(k, {}), spec) for k, v in value.items()}
    return value


def _valid(value, schema, spec):
    document = {**schema, "components": spec.get("components", {})}
    if jsonschema.Draft4Validator(document).is_valid(value):
        return True
    if isinstance(value, dict):  # an empty member may stand for `{}`
        emptied = {k: ({} if v == "" else v) for k, v in value.items()}
        return emptied != value and jsonschema.Draft4Validator(document).is_valid(emptied)
    return False


def _sent_query_is_valid(case, response):
    spec = case.operation.schema.raw_schema
    declared = {}
    for parameter in case.operation.definition.raw.get("parameters", []):
        if "$ref" in parameter:
            parameter = spec["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
        if parameter.get("in") == "query":
            declared[parameter["name"]] = parameter.get("schema", {})
    sent = {}
    for name, value in parse_qsl(urlsplit(response.request.url).query, keep_blank_values=True):
        _member(sent, name, value)
    return all(
        name in declared and _valid(_coerce(value, declared[name], spec), declared[name], spec)
        for name, value in sent.items()
    )


def _valid_as_sent(failure, case, response):
    return failure.code == "ST201" and case.method.upper() == "GET" and _sent_query_is_valid(case, response)


# 11. Text holding U+0000 (NUL) is refused with a 400 naming where it is, in any operation: neither
#     database stores it in text (PostgreSQL refuses it outright), so accepting it would fail the
#     write. The schema's strings admit any character. The request must really hold a NUL at the
#     field the problem names (a string or a key of the body, or a query parameter as sent).
_NUL_DETAIL = "text must not contain the NUL character (U+0000)"


def _nul_paths(value, at=""):
    """Where `value` holds a NUL, spelt as the ledger names fields (`labels.x`, `a[0].b`)."""
    if isinstance(value, str):
        return {at or "body"} if "\x00" in value else set()
    if isinstance(value, list):
        return {p for i, v in enumerate(value) for p in _nul_paths(v, f"{at}[{i}]")}
    if isinstance(value, dict):
        paths = set()
        for key, v in value.items():
            member = f"{at}.{key}" if at else str(key)
            paths |= {member} if "\x00" in str(key) else _nul_paths(v, member)
        return paths
    return set()


def _nul_refused(case, response, field):
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return False
    if detail != _NUL_DETAIL or not field:
        return False
    sent = parse_qsl(urlsplit(response.request.url).query, keep_blank_values=True)
    in_query = {name for name, value in sent if "\x00" in name or "\x00" in value}
    # A batch of events is read one event at a time: the ledger names the field within its event.
    return field in in_query or any(p == field or p.endswith(("." + field, "]" + field)) for p in _nul_paths(case.body))


_DROPPED = Counter()
atexit.register(lambda: _DROPPED and print("Documented exclusions applied:", dict(sorted(_DROPPED.items()))))


def _excluded(failure, case, response):
    """The name of the exclusion that covers this failure, if one does."""
    field = _problem(response)
    if failure.code == "ST202" and response.status_code == 400 and _nul_refused(case, response, field):
        return "nul_character"
    if failure.code == "ST202" and response.status_code == 400:
        rule = next((r for r in _REFUSED_ON_PURPOSE.get(_operation(case), ()) if r(case, field)), None)
        return rule and rule.__name__.lstrip("_")
    if failure.code == "ST103" and _key_conflict(case, response, field):
        return "key_conflict"
    if _valid_as_sent(failure, case, response):
        return "valid_as_sent"
    return None


@schemathesis.hook
def filter_failure(ctx, failure, case, response):
    """Keeps every failure except the documented exclusions above."""
    name = _excluded(failure, case, response)
    if name:
        _DROPPED[name] += 1
    return name is None

