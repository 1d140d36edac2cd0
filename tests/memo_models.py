"""The users, roles and handler both memoize_identity test files build their apps on.

Users and roles many-to-many in SQLAlchemy (what ``bind_sqlalchemy`` snapshots with
``relationships=("roles",)``), two seeded users, and Flask-Principal's documented
``identity_loaded`` handler.
"""

from __future__ import annotations

from typing import Any

from flask_login import current_user
from flask_principal import Identity, RoleNeed, UserNeed
from sqlalchemy import Column, ForeignKey, String, Table, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


class Base(DeclarativeBase):
    pass


user_roles = Table(
    "memo_user_roles",
    Base.metadata,
    Column("user_id", ForeignKey("memo_users.id"), primary_key=True),
    Column("role_id", ForeignKey("memo_roles.id"), primary_key=True),
)


class Role(Base):
    __tablename__ = "memo_roles"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class User(Base):
    __tablename__ = "memo_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    roles: Mapped[list[Role]] = relationship(secondary=user_roles, order_by=Role.id)

    is_authenticated = True
    is_active = True
    is_anonymous = False

    def get_id(self) -> str:
        return str(self.id)


def seed(url: str) -> None:
    """Create the tables at ``url``: alice (admin, editor) and bob (editor)."""
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with sessionmaker(engine)() as s:
        admin, editor = Role(id=1, name="admin"), Role(id=2, name="editor")
        s.add_all([User(id=1, name="alice", roles=[admin, editor]), User(id=2, name="bob", roles=[editor])])
        s.commit()
    engine.dispose()


def documented(sender: Any, identity: Identity) -> None:
    """Flask-Principal's documented handler."""
    identity.user = current_user
    if current_user.is_authenticated:
        identity.provides.add(UserNeed(current_user.id))
        for role in current_user.roles:
            identity.provides.add(RoleNeed(role.name))
