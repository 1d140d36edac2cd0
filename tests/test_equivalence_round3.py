"""Round 3 attacks: the new fast paths, driven from outside and compared with the bare app.

Each test runs the same thing twice -- through the wrapped pieces (the session
wrapper and its Cookie-header cache, the session-identifier memo, the inlined ``g``
methods, a ``bind_sqlalchemy`` cache hit) and through the bare ones -- and compares
what app code can observe. Real Flask, Flask-Login, Flask-Principal and SQLAlchemy.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Column, ForeignKey, String, Table, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, scoped_session, sessionmaker

from identity_middleware import UserCache
from identity_middleware.sqlalchemy import bind_sqlalchemy

# -- SQLAlchemy: a snapshot that reaches other users ----------------------------------------


class TreeBase(DeclarativeBase):
    pass


tree_user_roles = Table(
    "tree_user_roles",
    TreeBase.metadata,
    Column("user_id", ForeignKey("tree_users.id"), primary_key=True),
    Column("role_id", ForeignKey("tree_roles.id"), primary_key=True),
)


class TreeRole(TreeBase):
    __tablename__ = "tree_roles"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    users: Mapped[list[TreeUser]] = relationship(
        secondary=tree_user_roles, back_populates="roles", order_by="TreeUser.id"
    )


class TreeUser(TreeBase):
    """A user whose snapshot reaches other users: its manager, and its roles' members."""

    __tablename__ = "tree_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(100))
    manager_id: Mapped[int | None] = mapped_column(ForeignKey("tree_users.id"))
    manager: Mapped[TreeUser | None] = relationship(remote_side=[id])
    roles: Mapped[list[TreeRole]] = relationship(
        secondary=tree_user_roles, back_populates="users", order_by=TreeRole.id
    )


def _tree_view(user) -> tuple:
    """Everything of the user's snapshot tree an app could read."""
    if user is None:
        return (None,)
    return (
        user.email,
        None if user.manager is None else (user.manager.id, user.manager.email),
        [(role.name, [(member.id, member.email) for member in role.users]) for role in user.roles],
    )


def _rename_the_manager(db):
    db.get(TreeUser, 2).email = "robert@x"


def _a_member_of_a_shared_role_is_renamed(db):
    db.get(TreeUser, 3).email = "caroline@x"


def _someone_joins_a_shared_role_through_the_role(db):
    role, user = db.get(TreeRole, 2), db.get(TreeUser, 4)  # held: the session keeps rows weakly
    role.users.append(user)


def _someone_joins_a_shared_role_through_the_user(db):
    user, role = db.get(TreeUser, 4), db.get(TreeRole, 2)
    user.roles.append(role)


def _the_manager_is_deleted(db):
    db.delete(db.get(TreeUser, 2))


def _a_new_user_joins_a_shared_role(db):
    db.add(TreeUser(id=5, email="eve@x", roles=[db.get(TreeRole, 2)]))


@pytest.mark.parametrize(
    "change",
    [
        _rename_the_manager,
        _a_member_of_a_shared_role_is_renamed,
        _someone_joins_a_shared_role_through_the_role,
        _someone_joins_a_shared_role_through_the_user,
        _the_manager_is_deleted,
        _a_new_user_joins_a_shared_role,
    ],
)
def test_a_committed_change_to_another_user_in_the_snapshot_is_seen_by_the_next_hit(tmp_path, change):
    engine = create_engine(f"sqlite:///{tmp_path / 'tree.sqlite'}")
    TreeBase.metadata.create_all(engine)
    with Session(engine) as s:
        admin, staff = TreeRole(id=1, name="admin"), TreeRole(id=2, name="staff")
        boss = TreeUser(id=2, email="bob@x", roles=[staff])
        s.add_all(
            [
                TreeUser(id=1, email="alice@x", manager=boss, roles=[admin, staff]),
                TreeUser(id=3, email="carol@x", roles=[staff]),
                TreeUser(id=4, email="dave@x"),
            ]
        )
        s.commit()
    db = scoped_session(sessionmaker(engine))
    cache = UserCache(ttl=300)
    binding = bind_sqlalchemy(cache, db, TreeUser, relationships=("manager", "roles", "roles.users"))

    def load(user_id):
        return db.get(TreeUser, int(user_id))

    def wrapped(user_id):
        db.remove()
        return _tree_view(cache.get(user_id, load))

    def bare(user_id):
        db.remove()
        return _tree_view(load(user_id))

    try:
        for user_id in (1, 2, 3, 4):
            assert wrapped(user_id) == bare(user_id)
            assert wrapped(user_id) == bare(user_id)  # a hit, the same
        db.remove()
        change(db)
        db.commit()
        for user_id in (1, 2, 3, 4):
            assert wrapped(user_id) == bare(user_id), user_id
    finally:
        binding.remove()
        db.remove()
        engine.dispose()
