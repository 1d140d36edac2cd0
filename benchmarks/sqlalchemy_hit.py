"""What a cached SQLAlchemy user costs per request, against loading it fresh.

One request's worth of work, each with its own session opened and closed like
Flask-SQLAlchemy does per request, user + 2 roles, on SQLite (file) and on
PostgreSQL (a database created for the run and dropped after):

* **fresh load**: ``session.get(User, 1)`` and ``user.roles`` -- the anchor
  (a pool checkout, two SELECTs);
* **cache hit via bind_sqlalchemy**: ``UserCache.get`` with the adapter, the
  user rebuilt in the request's session, roles read (target <= 0.10x the fresh
  load on PostgreSQL); and the same hit on the adapter's public path, which it
  takes when its check of the private seams fails (``make_transient_to_detached``
  per row and ``Session.add``; see identity_middleware/sqlalchemy.py);
* **cache miss via bind_sqlalchemy**: the cache cleared, then the same get: the
  loader, the snapshot, the store -- with the store rule (``after_begin`` and
  ``load``/``refresh`` listeners noting which transaction read each row, the
  ``begin_load``/``storable`` check) and, on a second set of tables and classes so
  that no listener of the first binding fires, with that rule taken out; the two
  differ by less than a database round trip varies on a shared machine, so
* **the store rule's own work per miss** is also timed directly: a transaction
  start, three row loads and the two checks, as the listeners run them;
* the reattachment strategies that were compared before choosing, without the
  cache around them: ``merge(cached, load=False)``; a snapshot rebuilt with
  ``make_transient_to_detached`` + ``Session.add``; the same snapshot registered
  in the identity map directly (not used: it skips the attach events); a
  detached copy that is never attached; and an empty session opened and closed
  (the floor every variant pays).

Best of several interleaved repeats; ratios matter, microseconds do not. The
PostgreSQL rows become a note when no server answers at ``IDENTITY_TEST_POSTGRES``
(default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).

Run: ``python -m benchmarks.sqlalchemy_hit [--quick]``.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    make_transient_to_detached,
    mapped_column,
    relationship,
    scoped_session,
    sessionmaker,
)
from sqlalchemy.orm.attributes import instance_dict, instance_state, set_committed_value

from identity_middleware import UserCache
from identity_middleware.sqlalchemy import bind_sqlalchemy

from ._common import markdown_table, standalone

POSTGRES_ADMIN_URL = os.environ.get("IDENTITY_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class _Base(DeclarativeBase):
    pass


_user_roles = sa.Table(
    "bench_user_roles",
    _Base.metadata,
    sa.Column("user_id", sa.ForeignKey("bench_users.id"), primary_key=True),
    sa.Column("role_id", sa.ForeignKey("bench_roles.id"), primary_key=True),
)


class Role(_Base):
    __tablename__ = "bench_roles"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(80))


class User(_Base):
    __tablename__ = "bench_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(255))
    active: Mapped[bool] = mapped_column(default=True)
    roles: Mapped[list[Role]] = relationship(secondary=_user_roles, order_by=Role.id)


class _RuleOffBase(DeclarativeBase):
    """The same tables again, for the miss without the store rule: instance listeners
    are per class, so the rule-on binding's would fire for ``User``/``Role`` rows."""


_rule_off_user_roles = sa.Table(
    "bench_off_user_roles",
    _RuleOffBase.metadata,
    sa.Column("user_id", sa.ForeignKey("bench_off_users.id"), primary_key=True),
    sa.Column("role_id", sa.ForeignKey("bench_off_roles.id"), primary_key=True),
)


class RuleOffRole(_RuleOffBase):
    __tablename__ = "bench_off_roles"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(80))


class RuleOffUser(_RuleOffBase):
    __tablename__ = "bench_off_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(255))
    active: Mapped[bool] = mapped_column(default=True)
    roles: Mapped[list[RuleOffRole]] = relationship(secondary=_rule_off_user_roles, order_by=RuleOffRole.id)


class _WithoutStoreRule:
    """The binding's adapter without ``begin_load``/``storable``: every load stored."""

    def __init__(self, binding: Any) -> None:
        self.to_cache, self.from_cache = binding.to_cache, binding.from_cache


def _seed(engine: sa.Engine) -> None:
    _Base.metadata.create_all(engine)
    _RuleOffBase.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1, email="alice@example.com", roles=[Role(id=1, name="admin"), Role(id=2, name="editor")]))
        s.add(
            RuleOffUser(
                id=1, email="alice@example.com", roles=[RuleOffRole(id=1, name="admin"), RuleOffRole(id=2, name="editor")]
            )
        )
        s.commit()


def _variants(engine: sa.Engine) -> tuple[list[tuple[str, Callable[[], Any]]], Callable[[], None]]:
    """(name, one request's work) pairs on ``engine``, and a cleanup."""
    factory = sessionmaker(engine)
    db = scoped_session(factory)
    cache = UserCache(ttl=3600)
    binding = bind_sqlalchemy(cache, db, User, relationships=("roles",))

    def loader(user_id: str) -> User | None:
        return db.get(User, int(user_id))

    cache.get("1", loader)
    db.remove()

    # The miss without the store rule: its own classes, its listeners taken out again.
    off_db = scoped_session(sessionmaker(engine))
    off_cache = UserCache(ttl=3600)
    off_binding = bind_sqlalchemy(off_cache, off_db, RuleOffUser, relationships=("roles",))
    sa.event.remove(off_db, "after_begin", off_binding._after_begin)
    for cls, event_name, fn in off_binding._instance_listeners:
        sa.event.remove(cls, event_name, fn)
    off_cache.adapter = _WithoutStoreRule(off_binding)  # type: ignore[assignment]

    def off_loader(user_id: str) -> RuleOffUser | None:
        return off_db.get(RuleOffUser, int(user_id))

    with factory(expire_on_commit=False) as s:
        template = s.get(User, 1)
        _ = template.roles  # loaded, then detached when the session closes
    snapshot = (
        (User, {"id": 1, "email": "alice@example.com", "active": True}),
        [(Role, {"id": 1, "name": "admin"}), (Role, {"id": 2, "name": "editor"})],
    )

    def build(cls: type, values: dict[str, Any]) -> Any:
        obj = cls._sa_class_manager.new_instance()  # type: ignore[attr-defined]
        instance_dict(obj).update(values)
        return obj

    def fresh() -> Any:
        with factory() as s:
            user = s.get(User, 1)
            return [r.name for r in user.roles]

    def hit() -> Any:
        user = cache.get("1", loader)
        names = [r.name for r in user.roles]
        db.remove()
        return names

    private_attach = binding._attach  # chosen by the first hit above

    def hit_public_path() -> Any:
        binding._attach = None  # what a failed check of the private seams leaves
        try:
            user = cache.get("1", loader)
            names = [r.name for r in user.roles]
        finally:
            binding._attach = private_attach
        db.remove()
        return names

    def miss() -> Any:
        cache.clear()
        user = cache.get("1", loader)
        names = [r.name for r in user.roles]
        db.remove()
        return names

    def miss_rule_off() -> Any:
        off_cache.clear()
        user = off_cache.get("1", off_loader)
        names = [r.name for r in user.roles]
        off_db.remove()
        return names

    # The rule's own work for one miss, called directly: a transaction starts, three
    # rows load, the cache asks before and after (a miss's end-to-end difference is
    # within the noise of a database round trip on a shared machine).
    rule_session = factory()
    rule_user = rule_session.get(User, 1)
    rule_rows = [instance_state(row) for row in (rule_user, *rule_user.roles)]  # its listeners are raw: states
    rule_transaction = rule_session.get_transaction()
    rule_key = binding._txn_key

    class _Context:
        session = rule_session

    def rule_only() -> Any:
        token = binding.begin_load()
        rule_session.info.pop(rule_key, None)
        binding._after_begin(rule_session, rule_transaction, None)  # type: ignore[arg-type]
        for row in rule_rows:
            binding._on_load(row, _Context)
        if not binding.storable(rule_user, None, token):
            raise AssertionError("the rule refused rows read after its token")
        return expected_names

    expected_names = ["admin", "editor"]

    def merge() -> Any:
        with factory() as s:
            user = s.merge(template, load=False)
            return [r.name for r in user.roles]

    def snapshot_add() -> Any:
        with factory() as s:
            user = build(*snapshot[0])
            roles = [build(*r) for r in snapshot[1]]
            for role in roles:
                make_transient_to_detached(role)
            set_committed_value(user, "roles", roles)
            make_transient_to_detached(user)
            s.add(user)
            return [r.name for r in user.roles]

    def snapshot_private() -> Any:
        with factory() as s:

            def register(obj: Any) -> Any:
                state = instance_state(obj)
                state.key = state.mapper._identity_key_from_state(state)
                s.identity_map._add_unpresent(state, state.key)  # type: ignore[attr-defined]
                state.session_id = s.hash_key
                return obj

            user = build(*snapshot[0])
            set_committed_value(user, "roles", [register(build(*r)) for r in snapshot[1]])
            register(user)
            return [r.name for r in user.roles]

    def detached_copy() -> Any:
        with factory():
            user = build(*snapshot[0])
            roles = [build(*r) for r in snapshot[1]]
            set_committed_value(user, "roles", roles)
            make_transient_to_detached(user)
            return [r.name for r in user.roles]

    def empty_session() -> Any:
        with factory():
            return None

    def cleanup() -> None:
        binding.remove()
        db.remove()
        off_cache.adapter = off_binding
        off_binding.remove()
        off_db.remove()
        rule_session.close()

    variants = [
        ("fresh load: session.get + roles", fresh),
        ("cache hit via bind_sqlalchemy", hit),
        (HIT_PUBLIC if private_attach is not None else HIT_PUBLIC + " (the check failed: same as above)", hit_public_path),
        (MISS, miss),
        (MISS_RULE_OFF, miss_rule_off),
        (RULE_ONLY, rule_only),
        ("alt: merge(cached, load=False)", merge),
        ("alt: snapshot + make_transient_to_detached + add", snapshot_add),
        ("alt: snapshot + private identity-map registration", snapshot_private),
        ("alt: detached copy, never attached", detached_copy),
        ("floor: empty session open/close", empty_session),
    ]
    return variants, cleanup


def _measure(variants: list[tuple[str, Callable[[], Any]]], quick: bool) -> dict[str, float]:
    """Best-of-repeats microseconds per call, variants interleaved."""
    repeats = 3 if quick else 7
    budget = 0.03 if quick else 0.15  # seconds per variant per repeat
    expected = variants[0][1]()
    numbers: dict[str, int] = {}
    for name, fn in variants:
        result = fn()
        if name != variants[-1][0] and result != expected:
            raise AssertionError(f"{name} returned {result!r}, expected {expected!r}")
        started = time.perf_counter()
        count = 0
        while time.perf_counter() - started < budget / 4:
            fn()
            count += 1
        numbers[name] = max(20, int(count * 4))
    best = {name: float("inf") for name, _ in variants}
    for _ in range(repeats):
        for name, fn in variants:
            n = numbers[name]
            started = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - started) / n * 1e6)
    return best


HIT_PUBLIC = "cache hit, the adapter's public path (Session.add)"
MISS = "cache miss via bind_sqlalchemy (store rule on)"
MISS_RULE_OFF = "cache miss, store rule taken out (decomposition only)"
RULE_ONLY = "store rule's own work per miss (user + 2 roles)"


def _rows(case: str, engine: sa.Engine, quick: bool) -> list[dict[str, Any]]:
    variants, cleanup = _variants(engine)
    try:
        best = _measure(variants, quick)
    finally:
        cleanup()
    fresh = best[variants[0][0]]
    return [
        {
            "benchmark": "sqlalchemy_hit",
            "case": case,
            "variant": name,
            "us_per_call": round(us, 2),
            "vs_fresh": round(us / fresh, 4),
        }
        for name, us in best.items()
    ]


def _sqlite(quick: bool) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        engine = sa.create_engine(f"sqlite:///{os.path.join(folder, 'bench.db')}")
        try:
            _seed(engine)
            return _rows("SQLite file", engine, quick)
        finally:
            engine.dispose()


def _postgres(quick: bool) -> list[dict[str, Any]]:
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"im_bench_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        return [
            {
                "benchmark": "sqlalchemy_hit",
                "case": "PostgreSQL",
                "variant": "skipped",
                "note": f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {reason}",
            }
        ]
    engine = sa.create_engine(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name)
    try:
        _seed(engine)
        return _rows("PostgreSQL (loopback)", engine, quick)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run(quick: bool = False) -> list[dict[str, Any]]:
    """One row per backend and variant: microseconds per request and the ratio to a fresh load."""
    return _sqlite(quick) + _postgres(quick)


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [
        (row["case"], row["variant"], f"{row['us_per_call']:.1f}", f"{row['vs_fresh']:.3f}x")
        if "us_per_call" in row
        else (row["case"], row["variant"], "", row["note"])
        for row in rows
    ]
    return markdown_table(("backend", "variant", "us per request", "vs fresh load"), cells)


if __name__ == "__main__":
    standalone(f"SQLAlchemy user: cache hit vs fresh load (SQLAlchemy {sa.__version__})", run, _table)
