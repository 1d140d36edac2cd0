"""A cache hit's rows join Flask-SQLAlchemy's session when the request first looks.

In the bare app the user loader's ``db.session.get()`` creates the request's
session, begins its transaction and puts the user and its roles in it; at the
end of the app context Flask-SQLAlchemy closes it again. A request that only
reads ``current_user``'s loaded attributes (most API requests) never needs any of
that, yet it is a third of what a cache hit costs.

So on a hit in an app context whose ``db.session`` does not exist yet, the rows
are built as usual but left waiting (:class:`Deferred`), and the session is
created the moment anything could tell the difference:

* the app creates the scope's session (``db.session.get()``, ``Model.query``,
  ``user in db.session``, a commit, ...): the registry's ``createfunc`` attaches
  the rows first, so the session holds them exactly as in the bare app;
* anything reads a waiting row's ``session_id``, which is how SQLAlchemy answers
  ``object_session()``, ``inspect(user).session``/``persistent``, a lazy load of
  an attribute the snapshot does not hold, an attribute change, another session's
  ``add()``, ``pickle``: the row's state is a :class:`_WaitingState` until then,
  and its ``session_id`` attaches the rows (creating the session) before it answers.

If the scope ends first (Flask-SQLAlchemy's teardown, or ``db.session.remove()``),
the rows become what closing the session would have left: detached.

Rows wait only when nothing could observe the attach as an event: the session
class has no listeners for the events that the attach and the close fire (other
than the binding's own, which have nothing to do for a session that never
began). Otherwise, and for any session that is not Flask-SQLAlchemy's
app-context-scoped ``db.session``, hits attach at once as before.

What stays different while rows wait (each has a strict-xfail differential test
in tests/test_deferred_attach_attacks.py; ``bind_sqlalchemy(wait_for_session=False)``
turns waiting off): ``db.session.registry.has()`` is false;
``db.session.configure()`` also changes the request's session, without a warning;
a direct ``registry.set()`` raises as ``db.session(**kw)`` does, and a direct
``registry.clear()`` leaves the rows detached; ``close_all_sessions()`` does not
reach them; a session listener added mid-request hears their attach when it
happens and not their close; a waiting row's state is an instance of a subclass
of ``InstanceState``.

The seams (``InstanceState``'s layout, ``ScopedRegistry``'s ``createfunc``, the
class-level listener registry) are checked when a binding is made
(:func:`seam_problem`); if one fails, hits attach at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.util import ScopedRegistry

__all__ = ["Deferred", "DeferringRegistry", "deferring_registry", "seam_problem"]

#: What attaching a hit's rows, and closing a session that holds only them, fire
#: (tests/test_deferred_attach.py records every session event to check this list).
EVENTS = (
    "after_transaction_create",
    "before_attach",
    "after_attach",
    "detached_to_persistent",
    "persistent_to_detached",
    "after_transaction_end",
)

_DEFERRED = "_identity_middleware_deferred"  # a waiting state's __dict__ key: its Deferred

#: Serialises attaching: two threads reading one waiting row's session_id must both
#: see it attached. Reentrant: attaching may create the session, whose createfunc attaches.
_lock = threading.RLock()


class _WaitingState(InstanceState):  # type: ignore[type-arg]
    """The state of a row waiting for its session: the first read of ``session_id`` attaches it."""

    __slots__ = ()

    @property  # type: ignore[override]
    def session_id(self) -> Any:
        _settle(self)
        return self.session_id

    @session_id.setter
    def session_id(self, value: Any) -> None:
        _settle(self)
        self.session_id = value

    def __reduce_ex__(self, protocol: Any) -> Any:
        _settle(self)  # pickles as the InstanceState it then is
        return self.__reduce_ex__(protocol)


def _settle(state: InstanceState) -> None:
    deferred = state.__dict__.get(_DEFERRED)
    if deferred is not None:
        deferred.attach_now()


class Deferred:
    """One hit's rows, in attach order, waiting for the session of the scope they were loaded in."""

    __slots__ = ("registry", "key", "states", "attach")

    def __init__(
        self,
        registry: DeferringRegistry,
        key: Any,
        states: Sequence[InstanceState],
        attach: Callable[[Session, Sequence[InstanceState]], None],
    ) -> None:
        self.registry, self.key, self.states, self.attach = registry, key, states, attach
        for state in states:
            state.__dict__[_DEFERRED] = self
            state.__class__ = _WaitingState

    def _restore(self) -> None:
        for state in self.states:
            state.__class__ = InstanceState
            state.__dict__.pop(_DEFERRED, None)

    def attach_now(self) -> None:
        """Attach the rows to their scope's session, creating it (a read of a waiting row)."""
        with _lock:
            registry, key = self.registry, self.key
            if registry.pending.get(key) is not self:
                return  # attached or forgotten meanwhile
            session = registry.registry.get(key)
            if session is None:
                try:
                    here = registry.scopefunc() == key
                except Exception:  # no app context here (another thread): still the loading scope's session
                    here = False
                # In the loading scope the registry creates it (its createfunc attaches the rows).
                session = registry() if here else registry.registry.setdefault(key, registry.create())
            if registry.pending.get(key) is self:
                del registry.pending[key]
                self.into(session)

    def into(self, session: Session) -> None:
        """Attach the rows to ``session`` (the scope's session, just created)."""
        self._restore()
        # A row whose object the app let go of meanwhile would have left the session's
        # weak identity map (the states are held here, their objects are not).
        self.attach(session, [state for state in self.states if state.obj() is not None])

    def forget(self) -> None:
        """The scope ended with the rows never looked at: detached, as the close would leave them."""
        self._restore()


class DeferringRegistry(ScopedRegistry):  # type: ignore[type-arg]
    """``db.session``'s registry, over the same sessions, that attaches waiting rows on creation."""

    __slots__ = ("pending", "create", "_listeners", "_ignore")

    def __init__(
        self,
        original: ScopedRegistry,  # type: ignore[type-arg]
        listeners: tuple[Any, ...],
        ignore: Callable[..., Any],
    ) -> None:
        super().__init__(self._create, original.scopefunc)
        self.registry = original.registry  # the same sessions, one dict
        self.create: Any = original.createfunc  # a sessionmaker (deferring_registry checks)
        self.pending: dict[Any, Deferred] = {}
        self._listeners = listeners  # listeners_of(self.create)
        self._ignore = ignore  # a listener function with nothing to do for a session that never began

    def _create(self) -> Any:
        session = self.create()
        with _lock:
            deferred = self.pending.pop(self.scopefunc(), None)
            if deferred is not None:
                deferred.into(session)
        return session

    def set(self, obj: Any) -> None:
        # scoped_session(**kw) checks has() and then set()s; the bare app's session
        # would exist, so refuse as scoped_session would have.
        if self.scopefunc() in self.pending:
            raise InvalidRequestError("Scoped session is already present; no new arguments may be specified.")
        super().set(obj)

    def clear(self) -> None:
        key = self.scopefunc()
        with _lock:
            deferred = self.pending.pop(key, None)
            if deferred is not None:
                deferred.forget()
        super().clear()

    def scope_to_wait_in(self) -> Any:
        """The current scope's key if a hit's rows may wait in it, else None: its session
        does not exist, no rows wait in it yet (a second hit must meet the first one's
        rows in the identity map), and no listener of the session class would see the
        attach happen later."""
        key = self.scopefunc()
        if key in self.registry or key in self.pending or not _quiet(self._listeners, self._ignore):
            return None
        return key

    def defer(self, key: Any, states: Sequence[InstanceState], attach: Callable[..., None]) -> bool:
        """Let a hit's rows wait for the session of scope ``key`` (``scope_to_wait_in()``); False
        if they cannot (a custom instrumentation's state class, which waiting would replace)."""
        for state in states:
            if type(state) is not InstanceState:
                return False
        self.pending[key] = Deferred(self, key, states, attach)
        return True


def _quiet(listeners: tuple[Any, ...], ignore: Callable[..., Any]) -> bool:
    """Whether no listener in ``listeners`` (:func:`listeners_of`) but methods ``ignore``
    would see the attach or the close."""
    for found in listeners:
        for fn in found:
            if getattr(fn, "__func__", None) is not ignore:
                return False
    return True


def listeners_of(factory: Any) -> tuple[Any, ...] | None:
    """The class-level listener deques for EVENTS of ``factory``'s sessions, which SQLAlchemy
    changes in place on listen and remove; None if it keeps them elsewhere."""
    probe = factory()  # SQLAlchemy makes a session class's deque of an event on first use
    for name in EVENTS:
        getattr(probe.dispatch, name)
    cls: Any = factory.class_
    found = tuple(getattr(cls.dispatch, name)._clslevel.get(cls) for name in EVENTS)
    return None if any(deque is None for deque in found) else found


def deferring_registry(session: Any, ignore: Callable[..., Any]) -> DeferringRegistry | None:
    """The deferring registry of Flask-SQLAlchemy's ``db.session``, installed on first use; else None.

    ``ignore``: the function of the bindings' own listener methods on EVENTS, which have
    nothing to do for a session that never began.
    """
    if not isinstance(session, scoped_session):
        return None
    registry = session.registry
    if isinstance(registry, DeferringRegistry):
        return registry
    if type(registry) is not ScopedRegistry or not isinstance(registry.createfunc, sessionmaker):
        return None
    try:
        from flask_sqlalchemy.session import _app_ctx_id
    except ImportError:  # pragma: no cover - Flask-SQLAlchemy is how apps get an app-scoped session
        return None
    if registry.scopefunc is not _app_ctx_id or seam_problem() is not None:
        return None
    listeners = listeners_of(registry.createfunc)
    if listeners is None:
        return None
    deferring = DeferringRegistry(registry, listeners, ignore)
    session.registry = deferring
    return deferring


_seam_problem: list[str | None] = []


def seam_problem() -> str | None:
    """Why rows cannot wait with this SQLAlchemy, or None if they can (checked once)."""
    if not _seam_problem:
        _seam_problem.append(_check_seams())
    return _seam_problem[0]


def _check_seams() -> str | None:
    try:
        factory = sessionmaker()
        deques = listeners_of(factory)
        if deques is None:
            return "the class-level listener registry is not where deferred_attach looks"

        def probe(*args: Any) -> None:
            return None

        quiet = _quiet(deques, _check_seams)
        event.listen(factory, "before_attach", probe)
        heard = not _quiet(deques, _check_seams)
        event.remove(factory, "before_attach", probe)
        if not quiet or not heard or not _quiet(deques, _check_seams):
            return "class-level listeners are not seen where deferred_attach looks"
        if "__dict__" not in InstanceState.__slots__:
            return "InstanceState has no __dict__"
    except Exception as exc:  # any change in these internals means: attach at once
        return f"{type(exc).__name__}: {exc}"
    return None
