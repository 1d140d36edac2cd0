"""The store rule against real PostgreSQL: a load is stored only under a stamp that is
certainly not newer than the data it read.

The race (issue 13): request 1 runs its first query -> an admin revokes a role and
commits (the binding invalidates after commit) -> request 1 touches the user for the
first time. Its session's view predates the revocation -- a REPEATABLE READ snapshot,
or a row already in its identity map, under any isolation level -- but the stamp the
cache read just before the loader ran is the new one. Stored under that stamp, the old
roles would be served to every later request until the TTL ends.

Each "request" is a scoped session of its own (``scopefunc`` names the request), as
Flask-SQLAlchemy gives each app context one; SQL is counted with ``count_sql``.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Column, ForeignKey, String, Table, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, scoped_session, sessionmaker

from conftest import count_sql, wait_for
from identity_middleware import UserCache
from identity_middleware.sqlalchemy import bind_sqlalchemy


class Base(DeclarativeBase):
    pass


links = Table(
    "snap_user_roles",
    Base.metadata,
    Column("user_id", ForeignKey("snap_users.id"), primary_key=True),
    Column("role_id", ForeignKey("snap_roles.id"), primary_key=True),
)


class Role(Base):
    __tablename__ = "snap_roles"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class User(Base):
    __tablename__ = "snap_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(100))
    roles: Mapped[list[Role]] = relationship(secondary=links, order_by=Role.id)


ISOLATION = ["READ COMMITTED", "REPEATABLE READ"]


class Requests:
    """One engine at ``isolation``; ``enter(name)`` makes ``db`` that request's session."""

    def __init__(self, url: str, isolation: str, *, expire_on_commit: bool = True) -> None:
        self.engine = create_engine(url, isolation_level=isolation)
        Base.metadata.create_all(self.engine)
        with Session(self.engine) as s:
            s.add(User(id=1, email="alice@x", roles=[Role(id=1, name="admin"), Role(id=2, name="editor")]))
            s.add(Role(id=3, name="viewer"))
            s.commit()
        self.factory = sessionmaker(self.engine, expire_on_commit=expire_on_commit)
        self.current = "setup"
        self.db = scoped_session(self.factory, scopefunc=lambda: (threading.get_ident(), self.current))
        self.cache = UserCache(ttl=300)
        self.binding = bind_sqlalchemy(self.cache, self.db, User, relationships=("roles",), related=(Role,))
        self.loads = 0

    def loader(self, user_id):
        self.loads += 1
        return self.db.get(User, int(user_id))

    def enter(self, name: str) -> None:
        self.current = name

    def leave(self, name: str) -> None:
        self.current = name
        self.db.remove()

    def user(self):
        return self.cache.get("1", self.loader)

    def roles(self) -> list[str]:
        return [role.name for role in self.user().roles]

    def revoke_admin(self) -> None:
        """Another request: drop the admin role and commit; the binding invalidates."""
        with self.factory() as admin:
            user = admin.get(User, 1)
            user.roles = [role for role in user.roles if role.name != "admin"]
            admin.commit()

    def close(self) -> None:
        self.binding.remove()
        for name in ("r1", "r2", "r3", "setup"):
            self.leave(name)
        self.engine.dispose()


@pytest.fixture
def requests(postgres_url):
    made: list[Requests] = []

    def make(isolation: str, **options) -> Requests:
        made.append(Requests(postgres_url, isolation, **options))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize("isolation", ISOLATION)
def test_when_the_user_is_the_request_s_first_query_it_is_stored_and_hit(requests, isolation):
    r = requests(isolation)
    r.enter("r1")
    assert r.roles() == ["admin", "editor"]
    r.leave("r2")
    with count_sql(r.engine) as statements:
        assert r.roles() == ["admin", "editor"]
    assert statements == [] and r.loads == 1
    assert r.cache.stats().hits == 1


@pytest.mark.parametrize("isolation", ISOLATION)
@pytest.mark.parametrize("first_query", ["another table", "the user row itself"])
def test_a_revocation_after_the_request_s_first_query_is_never_served_later(requests, isolation, first_query):
    r = requests(isolation)
    r.enter("r1")
    if first_query == "another table":
        assert r.db.scalar(select(Role.name).where(Role.id == 3)) == "viewer"
    else:  # the user and its roles are in r1's identity map before the loader runs
        held = r.db.get(User, 1)  # held, as a view holds what it loaded (the map is weak)
        assert [role.name for role in held.roles] == ["admin", "editor"]
    r.revoke_admin()  # commits; the binding's after_commit invalidates user 1
    seen_by_r1 = r.roles()
    if isolation == "READ COMMITTED" and first_query == "another table":
        assert seen_by_r1 == ["editor"]  # a fresh SELECT: this load may be stored
    else:
        assert seen_by_r1 == ["admin", "editor"]  # r1's own (older) view, handed to r1 only
    r.leave("r2")
    assert r.roles() == ["editor"]
    r.leave("r3")
    with count_sql(r.engine) as statements:
        assert r.roles() == ["editor"]
    assert statements == []  # and the fresh load of r2 (or r1) was stored


@pytest.mark.parametrize("isolation", ISOLATION)
def test_a_row_kept_across_a_commit_without_expiry_is_not_stored(requests, isolation):
    # expire_on_commit=False: after r1's own commit its identity map still holds the
    # user and roles as read in the first transaction; session.get returns them without
    # SQL in the second one.
    r = requests(isolation, expire_on_commit=False)
    r.enter("r1")
    user = r.db.get(User, 1)
    assert [role.name for role in user.roles] == ["admin", "editor"]
    r.db.commit()
    r.revoke_admin()
    with count_sql(r.engine) as statements:
        assert r.roles() == ["admin", "editor"]  # r1's view
    assert all("snap_users" not in s for s in statements)  # from the identity map, no SQL for the user
    r.leave("r2")
    assert r.roles() == ["editor"]
    assert r.loads == 2


@pytest.mark.parametrize("isolation", ISOLATION)
def test_a_row_expired_by_commit_and_reloaded_in_a_later_transaction_is_stored(requests, isolation):
    # The default expire_on_commit=True: after r1's commit the user reloads by SQL in a
    # new transaction that began after the stamp was read -- current data, so stored.
    r = requests(isolation)
    r.enter("r1")
    assert [role.name for role in r.db.get(User, 1).roles] == ["admin", "editor"]
    r.db.commit()
    r.revoke_admin()
    assert r.roles() == ["editor"]
    r.leave("r2")
    with count_sql(r.engine) as statements:
        assert r.roles() == ["editor"]
    assert statements == [] and r.loads == 1


def test_a_role_already_in_the_identity_map_keeps_the_load_from_being_stored(requests):
    # The user is read fresh, but its role object was loaded before the revocation (and
    # keeps its old name even though the roles SELECT returns the new one).
    r = requests("READ COMMITTED")
    r.enter("r1")
    held = r.db.get(Role, 2)  # held: the identity map is weak
    assert held.name == "editor"
    with r.factory() as admin:
        admin.get(Role, 2).name = "writer"
        admin.commit()  # a related row changed: the binding invalidates everyone
    assert r.roles() == ["admin", "editor"]  # r1's identity map wins, as SQLAlchemy always does
    r.leave("r2")
    assert r.roles() == ["admin", "writer"]
    assert r.loads == 2


def test_callers_waiting_on_a_load_that_is_not_stored_load_again(requests):
    # Single flight: a caller that joins r1's load must not receive r1's older view.
    r = requests("REPEATABLE READ")
    r.enter("r1")
    entered, release = threading.Event(), threading.Event()
    original = r.loader

    def held(user_id):
        user = original(user_id)
        entered.set()
        release.wait(10)
        return user

    results: dict[str, list[str]] = {}
    queried, revoked = threading.Event(), threading.Event()

    def r1() -> None:  # its first query, then (after the revocation) the user
        assert r.db.scalar(select(Role.name).where(Role.id == 3)) == "viewer"
        queried.set()
        revoked.wait(10)
        results["r1"] = [role.name for role in r.cache.get("1", held).roles]
        r.db.remove()

    def r2() -> None:  # another thread: another scoped session, a new transaction
        results["r2"] = r.roles()
        r.db.remove()

    first = threading.Thread(target=r1)
    first.start()
    assert queried.wait(10)
    r.revoke_admin()
    revoked.set()
    assert entered.wait(10)
    second = threading.Thread(target=r2)
    second.start()
    assert wait_for(lambda: r.cache.stats().misses == 2)  # r2 missed and joined r1's flight
    release.set()
    first.join(10)
    second.join(10)
    assert results == {"r1": ["admin", "editor"], "r2": ["editor"]}
    assert r.loads == 2  # r2 loaded again instead of taking r1's result
