"""SQLAlchemy users from the cache that behave like fresh ones, invalidated on commit.

Caching an ORM object naively breaks in three ways. The object belongs to the
session of the request that loaded it, so in a later request ``user.roles``
raises ``DetachedInstanceError`` once anything expired it; the same Python object
is handed to concurrent requests, which then share (and race on) its state; and
it goes stale unless someone remembers to call ``invalidate`` after every role
change. :func:`bind_sqlalchemy` fixes all three for a :class:`UserCache`:

* **What is stored** is a snapshot: plain column values of the user and of the
  ``relationships`` you name (``"roles"``, or ``"roles.permissions"`` for nested
  ones), taken once after a load. Table columns only: deferred columns and SQL
  expressions (``column_property(select(...))``, which may read tables nothing
  watches) are left out and load on access, as current as on a loaded row. It
  holds no session, no connection and no ORM object, so it cannot go detached
  and is never mutated.
* **What a hit returns** is a new ORM instance built from that snapshot and added
  to the *current* session as if it had just been loaded: no SQL, the named
  relationships readable, anything else lazy-loads as usual, and it can be
  modified and committed. Its rows fire the ``load`` event as loaded rows do
  (:func:`_announce_loaded`: ``@reconstructor`` runs, ``sqlalchemy.ext.mutable``
  tracks in-place changes). Each caller gets its own object; when the current
  session already holds that user (or one of its roles) the session's own object
  is used, exactly as ``session.get`` would; when the session's transaction has
  written watched rows and not committed yet, its view may differ from the entry,
  so the loader runs instead (unstored).
* **Invalidation is automatic and happens only after commit.** Listeners on *your*
  session factory (not on every ``Session`` in the process) collect the users
  touched by a flush -- inserts, updates, deletes, changes to their relationship
  collections -- and the ORM-enabled bulk ``update()``/``delete()``/``insert()``
  statements on watched models, keep them in ``session.info`` and apply them in
  ``after_commit``. A rollback applies nothing. A change to the id Flask-Login uses
  (``user_id=``, e.g. a rotated ``fs_uniquifier``) invalidates the old id and the new.
* **A load is stored only if it is certainly not older than its stamp.** The cache
  reads the user's version stamp just before the loader runs, but the loader reads
  through the request's session, whose view can be older: under REPEATABLE READ the
  snapshot dates from the transaction's first query, and under any isolation level a
  row the session already holds comes back from the identity map without SQL (and
  keeps its old values even when a later SELECT returns new ones). So the binding
  numbers events in one sequence -- the cache's stamp read (``begin_load``), each
  watched session's transaction start (``after_begin``) -- and notes on every row of
  the user model and of the snapshotted relationships which transaction's SQL last
  filled it (``load`` and full ``refresh`` instance events). The load is stored only
  if the user and every snapshotted row were filled by SQL in a transaction that
  began after the stamp was read; that transaction's reads (READ COMMITTED or a
  snapshot) include every commit whose invalidation the stamp reflects. Otherwise
  the caller that ran the load gets its session's view and nothing is stored (DEBUG
  log). The common case stores: Flask-Login loads the user at the first touch of
  ``current_user``, usually the request's first query. A session bound to a
  ``Connection`` (whose transaction may have begun earlier) never stores.

Why a snapshot and not ``Session.merge(cached, load=False)``: ``merge`` is not
cheaper (benchmarks/sqlalchemy_hit.py, user + two roles: ~46 us for the merge
alone against ~29 us for a whole cache hit, where a fresh load costs ~380 us on
SQLite and ~1 ms on PostgreSQL), and it copies the cached state *onto* an object
the session already has, silently discarding that request's pending changes to
the user or to a shared ``Role``; it shares mutable column values (a JSON dict)
between requests; and it refuses cached objects that were ever modified.
Building from immutable data has none of these problems and needs no lock.

Where a hit's time goes (user + two roles, in an app context, best of many
rounds on a 2-core machine): the request's session itself -- created, its
transaction begun, closed -- ~17 us, which every request that uses its session
pays; building the three instances ~6 us; attaching them and the close detaching
them ~4.5 us. The public way to make rows persistent without SQL is
``set_committed_value`` per relationship, ``make_transient_to_detached`` per
instance and one ``Session.add``, which walks the save-update cascade from the
user to find what to attach. A hit knows more: each row's identity key and
missing attributes are fixed by its snapshot, every row is new, and it knows
every row it built. So, when the check below passes, a hit

* sets the key and expires the attributes a row lacks itself (what
  ``make_transient_to_detached`` does to a new instance, minus working them out:
  ``InstanceState._expire_attributes``); a row that lacks nothing gets no
  ``expire`` event, like a row loaded by a query;
* fills each relationship as the ORM's loaders do (a collection from the
  attribute's own factory, members appended without events), minus what
  ``set_committed_value`` does for history and pending appends a new instance
  cannot have (:func:`_set_loaded`);
* attaches all rows in one step (:func:`_attach_rows`): the session's autobegin
  once, then per row what ``Session._update_impl``, the step ``Session.add``
  ends in for a detached row, does: ``before_attach``, the identity map,
  ``after_attach``, ``detached_to_persistent``;
* when the session holds no rows yet and no identity occurs twice in the
  snapshot (the usual hit: the user is a request's first query), builds each
  row in one pass, with nothing to look up in the session or among the rows
  already built.

Same rows, same state, same events; ~29 against ~54 us per hit and teardown on
the public path (benchmarks/sqlalchemy_hit.py). These are private API, so the
binding checks them at its first hit (:func:`private_attach_problem`: a row made
detached and attached both ways, and every snapshotted relationship filled both
ways, must end in the same state, session bookkeeping and events, in scratch
sessions without a database); if the check fails, hits take the public path and
a WARNING says why. Only the instances a hit *built* are attached;
``Session.add``'s cascade would also have reached the session's own objects the
snapshot's relationships point at, where it has nothing to do -- except to take
back a pending ``session.delete()`` of one of them, which a cache hit should
not. Registering the rows in the identity map directly would save a few
microseconds more, but skips the attach events and the transaction; we do not.

What it does not see: SQL that bypasses the ORM (``text("UPDATE users ...")``,
``connection.execute(users.update())``, writes from other programs, direct
inserts into an association table). Call ``user_cache.invalidate(user_id)`` or
``invalidate_all()`` after those, and keep a TTL as the backstop.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import enum
import itertools
import logging
import operator
import uuid
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Mapping, Sequence

from sqlalchemy import Column, event, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import Mapper, Session, configure_mappers, make_transient_to_detached, scoped_session, sessionmaker
from sqlalchemy.orm.attributes import instance_dict, instance_state, set_committed_value
from sqlalchemy.orm.collections import collection_adapter
from sqlalchemy.orm.exc import DetachedInstanceError

from .cache import LOAD_AGAIN, OwnView
from .config import ConfigError
from .deferred_attach import DeferringRegistry, deferring_registry
from .versions import key_label

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState, SessionTransaction
    from sqlalchemy.orm.state import InstanceState

    from .cache import UserCache

__all__ = ["bind_sqlalchemy", "private_attach_problem", "SQLAlchemyBinding"]

log = logging.getLogger(__name__)

#: Values of these types are shared between snapshot and instances; anything else
#: (a JSON dict, a list, an array) is deep-copied so no request mutates the cache.
_IMMUTABLE = (
    str,
    int,
    float,
    bool,
    bytes,
    type(None),
    decimal.Decimal,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    uuid.UUID,
    enum.Enum,
    frozenset,
    complex,
)

# Collection relationships whose contents cannot be loaded once and held.
_UNLOADABLE = ("dynamic", "write_only", "noload", "raise", "raise_on_sql")

#: One order for "the cache read a stamp" (begin_load) and "a session transaction
#: began" (after_begin): ``next()`` is one atomic call, so a larger number happened later.
_SEQUENCE = itertools.count(1)

#: Key in InstanceState.info (its public place for user data): the sequence number of the transaction whose
#: SQL last filled all of the row's columns (and the relationships we snapshot). Rows
#: never read by SQL in a watched session (built from the cache, pending, merged)
#: have none and count as infinitely old.
_READ = "_identity_middleware_read"


class _Node:
    """An immutable snapshot of one ORM row and the relationships named below it."""

    __slots__ = ("new_instance", "key", "values", "copied", "children", "unloaded", "distinct")

    def __init__(
        self,
        manager: Any,
        key: tuple,
        values: dict[str, Any],
        copied: tuple[str, ...],
        children: tuple[tuple[str, bool, Any, Any], ...],
    ) -> None:
        self.new_instance = manager.new_instance  # builds an instance without __init__
        self.key = key  # the identity key, as the session's identity map uses it
        self.values = values  # column values; never mutated after construction
        self.copied = copied  # keys in values that each instance gets a deep copy of
        # (relationship, is_collection, tuple of nodes | node | None, its attribute implementation)
        self.children = children
        self.unloaded: tuple[str, ...] | None = None  # what a built instance lacks; set by its first build
        self.distinct = False  # on the root: no identity occurs twice in the tree (set by to_cache)

    def instance(self) -> tuple[Any, dict[str, Any]]:
        """A new instance holding this row's column values, and its ``__dict__``: what the
        ORM's own row loader fills (mutable values deep-copied, so no request changes ours)."""
        obj = self.new_instance()
        dict_ = instance_dict(obj)
        dict_.update(self.values)
        for name in self.copied:
            dict_[name] = copy.deepcopy(self.values[name])
        return obj, dict_

    def make_detached(self, state: InstanceState) -> None:
        """:func:`_to_detached` for an instance built from this node (the checked private path)."""
        unloaded = self.unloaded
        if unloaded is None:  # the same for every instance built from this node
            unloaded = self.unloaded = tuple(state.unloaded)
        _to_detached(state, self.key, unloaded)

    def __repr__(self) -> str:
        return f"<snapshot {self.key[0].__name__}{self.key[1]!r}>"


class _Pending:
    """What one session's current transaction changed, waiting for its commit."""

    __slots__ = ("ids", "everything")

    def __init__(self) -> None:
        self.ids: set[Hashable] = set()  # users whose rows or collections changed
        self.everything = False  # a watched related model or a bulk statement changed

    def __bool__(self) -> bool:
        return bool(self.ids or self.everything)


class SQLAlchemyBinding:
    """The adapter and the commit listeners that :func:`bind_sqlalchemy` installed.

    It is the cache's ``adapter`` (``to_cache``/``from_cache``); :meth:`remove`
    detaches the listeners, unsets the adapter and clears the cache (its entries
    are snapshots that only this binding can turn back into users).
    """

    __slots__ = (
        "user_cache",
        "user_model",
        "relationships",
        "related",
        "_target",
        "_current",
        "_tree",
        "_watched",
        "_user_id",
        "_pk_key",
        "_columns",
        "_add_cascades",
        "_listeners",
        "_instance_listeners",
        "_id_attribute",
        "_tree_names",
        "_txn_key",
        "_removed",
        "_attach",
        "_deferring",
        "_wait",
        "_users_in_tree",
        "__weakref__",
    )

    def __init__(
        self,
        user_cache: UserCache,
        target: Any,
        current: Callable[[], Session | None] | None,
        user_model: type,
        tree: dict[str, dict],
        relationships: tuple[str, ...],
        related: tuple[type, ...],
        watched_related: tuple[type, ...],
        user_id: str | Callable[[Any], Hashable] | None,
    ) -> None:
        self.user_cache = user_cache
        self.user_model = user_model
        self.relationships = relationships
        self.related = related
        self._target = target
        self._current = current
        self._tree = tree
        self._watched = (user_model, *watched_related)
        # user_id: None (the primary key), an attribute name, or any callable.
        self._id_attribute = user_id if isinstance(user_id, str) else None
        self._user_id = operator.attrgetter(user_id) if isinstance(user_id, str) else user_id
        mapper = _mapper_of(user_model, "user_model")
        self._pk_key = mapper.get_property_by_column(mapper.primary_key[0]).key
        self._columns: dict[Mapper, tuple[str, ...]] = {}
        # Whether adding the user reaches everything a hit builds (the usual case): then
        # one Session.add per hit, else one per instance the cascade does not reach.
        self._add_cascades = _cascades(mapper, tree, "save-update")
        # _attach_rows once the private seams passed their check, None for the public
        # path (module docstring). Checked at the first hit: the mappers are configured then.
        self._attach: Callable[[Session, Sequence[InstanceState]], None] | None = _unchecked
        # Flask-SQLAlchemy's db.session: a hit's rows may wait for the request to create
        # it (deferred_attach); set with _attach, once the private seams passed.
        self._deferring: DeferringRegistry | None = None
        self._wait = True  # bind_sqlalchemy(wait_for_session=...)
        self._removed = False
        self._listeners = (
            ("after_begin", self._after_begin),
            ("after_flush", self._after_flush),
            ("do_orm_execute", self._do_orm_execute),
            ("after_commit", self._after_commit),
            ("after_transaction_end", self._after_transaction_end),
        )
        self._txn_key = object()  # session.info key: (root SessionTransaction, its number)
        self._tree_names = frozenset(_names_in(tree))
        snapshotted = dict.fromkeys((user_model, *_targets_of(mapper, tree)))
        # Whether a snapshot can hold rows of other users (a manager, "roles.users"):
        # then a change to any user row, or to a related row's collections, may be in
        # other users' entries, which only invalidating everyone reaches.
        self._users_in_tree = any(
            issubclass(target, user_model) or issubclass(user_model, target) for target in _targets_of(mapper, tree)
        )
        self._instance_listeners = tuple(
            (cls, name, fn) for cls in snapshotted for name, fn in (("load", self._on_load), ("refresh", self._on_refresh))
        )

    # -- the cache adapter -----------------------------------------------------------

    def to_cache(self, value: Any) -> _Node | None:
        """Snapshot what the loader returned; called once per load, in the loading request.

        Loads what is missing first (expired columns, the named relationships) through
        the loader's session, so the snapshot never needs a session again.
        """
        if value is None:
            return None
        if not isinstance(value, self.user_model):
            raise TypeError(
                f"the user loader returned {value!r}; bind_sqlalchemy(..., {self.user_model.__name__}) "
                f"caches {self.user_model.__name__} instances or None"
            )
        state = instance_state(value)
        if state.key is None:
            raise ValueError(
                f"the user loader returned {value!r}, which is not persistent "
                "(pending or transient): only rows loaded from the database can be cached"
            )
        try:
            node = self._snapshot(state, self._tree)
        except DetachedInstanceError as exc:
            raise DetachedInstanceError(
                f"{exc} -- the user loader returned a detached {self.user_model.__name__} whose "
                f"{', '.join(self.relationships) or 'columns'} were not loaded; load them before the "
                "session closes (for example with selectinload) or return an attached instance"
            ) from exc
        node.distinct = _distinct_keys(node, set())
        return node

    def from_cache(self, stored: _Node | None) -> Any:
        """A user for the caller: the current session's own, or a new instance added to it.

        Wrapped in :class:`~identity_middleware.cache.OwnView` when the session
        already held rows (the user, or rows of its graph, which this request may
        have changed): a new graph built from the entry alone is handed out bare.
        """
        if stored is None:
            return None
        attach = self._attach
        if attach is _unchecked:
            attach = self._choose_attach()
        deferring = self._deferring
        scope = deferring.scope_to_wait_in() if deferring is not None and stored.distinct else None
        if deferring is not None and scope is not None:
            # The common hit of an API request: its app context has no session yet. The
            # rows wait for it; the request creates it only if it looks (deferred_attach).
            waiting: list[InstanceState] = []
            user = self._build_new(stored, waiting)
            if not deferring.defer(scope, waiting, attach):  # type: ignore[arg-type]  # _attach_rows when deferring is set
                attach(deferring(), waiting)  # type: ignore[misc]  # the scope's new session
            _announce_loaded(waiting)
            return user
        session = self._current() if self._current is not None else None
        if session is not None and session.info.get(self):  # a _Pending is falsy when empty
            # This session's transaction wrote watched rows and has not committed: its
            # view may differ from the entry (a bulk UPDATE, a flushed change it no longer
            # holds). The loader reads that view, as in the bare app.
            return LOAD_AGAIN
        built: dict[tuple, Any]  # the rows _build made, by identity (the fast path needs none)
        if session is None:
            built = {}
            user = self._build(stored, None, built)
            _announce_loaded(map(instance_state, built.values()))
            return user
        identity_map = session.identity_map
        first_use = not identity_map
        if attach is not None and stored.distinct and first_use:
            # The common hit: the request's first use of its session. Nothing the
            # snapshot names can be in the session yet and no identity occurs twice in
            # it, so there is nothing to look up or to merge: build each row once.
            states: list[InstanceState] = []
            user = self._build_new(stored, states)
            attach(session, states)
            _announce_loaded(states)
            return user
        in_session = identity_map.get
        existing = in_session(stored.key)
        if existing is not None:
            return OwnView(existing)  # the session's view wins, as with session.get()
        built = {}
        user = self._build(stored, in_session, built)
        states = [instance_state(obj) for obj in built.values()]
        if attach is not None:  # what Session.add ends in, minus the cascade walk
            attach(session, states)
        elif self._add_cascades:
            session.add(user)  # cascades to every instance built below it
        else:
            for state in states:  # the user first: its add cascades where it can
                if state.detached:
                    session.add(state.obj())
        _announce_loaded(states)
        # Rows the session held (and this request may have changed) stand in the graph.
        return user if first_use else OwnView(user)

    def _choose_attach(self) -> Callable[[Session, Sequence[InstanceState]], None] | None:
        problem = private_attach_problem(self.user_model, self.relationships)
        attach = _attach_rows if problem is None else None
        if problem is not None:
            log.warning(
                "bind_sqlalchemy: cache hits use make_transient_to_detached and Session.add (slower) because %s",
                problem,
            )
        self._attach = attach
        if attach is not None and self._wait and self._current is self._target:  # hits go to db.session itself
            # The binding's after_transaction_end has nothing to do for a session that never began.
            self._deferring = deferring_registry(self._target, SQLAlchemyBinding._after_transaction_end)
        return attach

    # -- the store rule: only loads not older than their stamp -------------------------

    def begin_load(self) -> int:
        """Called by the cache after it read the stamp for a load, before the loader runs."""
        return next(_SEQUENCE)

    def storable(self, value: Any, stored: Any, token: int) -> bool:
        """Whether the user and every snapshotted row were filled by SQL in a transaction
        that began after ``token`` (module docstring). Called after :meth:`to_cache`."""
        state = instance_state(value)
        session = state.session
        if session is not None and session.info.get(self):  # a _Pending is falsy when empty
            # This transaction changed watched rows and has not committed: the snapshot
            # may hold those changes. Its own caller gets them anyway (its session's
            # view); nobody else may. Refusing here, rather than invalidating during the
            # load, keeps a Redis outage from blocking or failing the load.
            return False
        return self._read_after(state, self._tree, token)

    def _read_after(self, state: InstanceState, tree: Mapping[str, dict], token: int) -> bool:
        if state.info.get(_READ, 0) <= token or state.modified:
            return False
        dict_ = state.dict
        for name, subtree in tree.items():
            loaded = dict_.get(name)  # to_cache loaded every named relationship
            items: Iterable[Any] = (
                [] if loaded is None else _members(loaded) if state.mapper.relationships[name].uselist else [loaded]
            )
            for item in items:
                if not self._read_after(instance_state(item), subtree, token):
                    return False
        return True

    def _after_begin(self, session: Session, transaction: SessionTransaction, connection: Connection) -> None:
        root = transaction
        while root.parent is not None:
            root = root.parent
        txn = session.info.get(self._txn_key)
        if txn is None or txn[0] is not root:
            # A session bound to a Connection joins a transaction that may have begun
            # long before: its snapshot's age is unknown, so its reads never count.
            external = isinstance(session.bind, Connection)
            session.info[self._txn_key] = (root, 0 if external else next(_SEQUENCE))

    def _transaction_number(self, context: Any) -> int:
        session = getattr(context, "session", None)
        txn = None if session is None else session.info.get(self._txn_key)
        return 0 if txn is None else txn[1]

    def _on_load(self, state: InstanceState, context: Any) -> None:
        # A new row in the identity map: every attribute came from this query. (Raw
        # listeners: they get the state. A hit's rows come with no query, context None,
        # and their number stays 0, "not filled by SQL", as for any row without one.)
        if context is not None:
            state.info[_READ] = self._transaction_number(context)

    def _on_refresh(self, state: InstanceState, context: Any, attrs: Iterable[str] | None) -> None:
        # An existing row reloaded. It counts only if every column was reloaded and no
        # snapshotted relationship kept a value from before (a partial refresh leaves
        # the older number, which is the age of its oldest attribute).
        if attrs is not None:
            attrs = set(attrs)
            dict_ = state.dict
            if not attrs.issuperset(self._columns_of(state.mapper)):
                return
            if any(name in dict_ and name not in attrs for name in self._tree_names):
                return
        state.info[_READ] = self._transaction_number(context)

    def _snapshot(self, state: InstanceState, tree: Mapping[str, dict]) -> _Node:
        obj = state.obj()
        dict_ = state.dict
        columns = self._columns_of(state.mapper)
        for key in columns:
            if key not in dict_:
                getattr(obj, key)  # expired: one refresh loads them all
        values = {key: dict_[key] for key in columns if key in dict_}
        copied = tuple(key for key, v in values.items() if not isinstance(v, _IMMUTABLE))
        for key in copied:
            values[key] = copy.deepcopy(values[key])
        children = []
        for name, subtree in tree.items():
            loaded = getattr(obj, name)  # lazy-loads in the loading request, if not loaded yet
            many = state.mapper.relationships[name].uselist
            nodes = []
            for item in _members(loaded) if many else ([] if loaded is None else [loaded]):
                item_state = instance_state(item)
                if item_state.key is None:
                    # pending, not in the database: left out here, and storable() refuses it
                    continue
                nodes.append(self._snapshot(item_state, subtree))
            impl = state.manager[name].impl
            children.append((name, True, tuple(nodes), impl) if many else (name, False, nodes[0] if nodes else None, impl))
        identity = state.key
        assert identity is not None  # callers pass persistent rows only (pending ones are skipped)
        return _Node(state.manager, identity, values, copied, tuple(children))

    def _build(self, node: _Node, in_session: Callable[[tuple], Any] | None, built: dict[tuple, Any]) -> Any:
        # One object per identity, as in a session: a row the tree reaches twice (a
        # role's users include the user itself) must not become two instances, or
        # attaching the second one fails.
        key = node.key
        obj = built.get(key)
        if obj is not None:
            self._add_children(obj, node, in_session, built)
            return obj
        if in_session is not None:
            existing = in_session(key)
            if existing is not None:
                return existing  # the session's view wins, as with session.get()
        obj, _ = node.instance()
        built[key] = obj
        for name, many, child, _ in node.children:
            set_committed_value(obj, name, self._build_child(many, child, in_session, built))
        # A key, clean history, missing columns expired; session.add then makes it
        # persistent at once, without SQL.
        if self._attach is _attach_rows:  # the private seams passed their check
            node.make_detached(instance_state(obj))
        else:
            make_transient_to_detached(obj)
        return obj

    def _build_new(self, node: _Node, states: list[InstanceState]) -> Any:
        """``_build`` for a tree without repeated identities, into a session that holds
        none of them, on the checked private path: the same instances, appended to
        ``states`` in the order ``_build`` would attach them."""
        obj, dict_ = node.instance()
        state = instance_state(obj)
        states.append(state)
        for _, many, child, impl in node.children:
            if many:
                value: Any = [self._build_new(item, states) for item in child]
            else:
                value = None if child is None else self._build_new(child, states)
            _set_loaded(state, dict_, impl, value)
        node.make_detached(state)
        return obj

    def _build_child(
        self, many: bool, child: Any, in_session: Callable[[tuple], Any] | None, built: dict[tuple, Any]
    ) -> Any:
        if many:
            return [self._build(item, in_session, built) for item in child]
        return None if child is None else self._build(child, in_session, built)

    def _add_children(
        self, obj: Any, node: _Node, in_session: Callable[[tuple], Any] | None, built: dict[tuple, Any]
    ) -> None:
        """Relationships another path reached ``obj`` with, set unless already set."""
        dict_ = instance_dict(obj)
        for name, many, child, _ in node.children:
            if name not in dict_:
                value = self._build_child(many, child, in_session, built)
                if name not in dict_:
                    set_committed_value(obj, name, value)

    def _columns_of(self, mapper: Mapper) -> tuple[str, ...]:
        columns = self._columns.get(mapper)
        if columns is None:
            # Columns deferred by the mapping stay unloaded and load on access, as usual.
            # So do SQL expressions (column_property(select(...)), func.now(), ...): a
            # loaded row computes them afresh, and they may read other tables, which no
            # invalidation watches. On a hit they load on first access, current.
            tables = set(mapper.tables)
            columns = tuple(
                p.key
                for p in mapper.column_attrs
                if not p.deferred and all(isinstance(c, Column) and c.table in tables for c in p.columns)
            )
            self._columns[mapper] = columns
        return columns

    # -- invalidation after commit ---------------------------------------------------

    def _pending(self, session: Session) -> _Pending:
        """What ``session``'s current transaction changed so far; created on first use."""
        pending = session.info.get(self)
        if pending is None:
            pending = session.info[self] = _Pending()
        return pending

    def _id(self, state: InstanceState) -> Hashable:
        """The loader id of a user, read without loading anything (we may be mid-flush)."""
        if self._user_id is not None:
            return self._user_id(state.obj())
        if state.key is not None:
            return str(state.key[1][0])
        return str(state.dict[self._pk_key])  # a row inserted by this flush: its key is set

    def _after_flush(self, session: Session, flush_context: Any) -> None:
        # Runs before the flushed states are finalised: new/dirty/deleted still say
        # what this flush wrote, and new rows already have their primary keys.
        for obj in session.new:
            if isinstance(obj, self._watched):
                self._changed(session, obj, inserted_or_deleted=True)
        for obj in session.deleted:
            if isinstance(obj, self._watched):
                self._changed(session, obj, inserted_or_deleted=True)
        for obj in session.dirty:
            if isinstance(obj, self._watched) and session.is_modified(obj):
                self._changed(session, obj, inserted_or_deleted=False)

    def _changed(self, session: Session, obj: Any, *, inserted_or_deleted: bool) -> None:
        pending = self._pending(session)
        state = instance_state(obj)
        try:
            if isinstance(obj, self.user_model):
                pending.ids.update(self._ids_of(state))
                if self._users_in_tree:
                    pending.everything = True  # other users' snapshots may hold this row
            elif inserted_or_deleted or self._users_in_tree:
                pending.everything = True
            else:
                self._related_changed(obj, state, pending)
        except Exception:
            # Never break the flush over bookkeeping (a user_id= callable that needs an
            # attribute this row no longer has, say): fall back to invalidating all.
            log.debug("could not tell which users %r affects; invalidating all on commit", obj, exc_info=True)
            pending.everything = True

    def _ids_of(self, state: InstanceState) -> Iterable[Hashable]:
        """Every id the user had in this flush: the current one and, if it changed, the old."""
        yield self._id(state)
        if self._user_id is None:
            if state.key is not None and self._pk_key in state.dict:
                # A changed primary key: the row is now known by its new id as well.
                current = str(state.dict[self._pk_key])
                if current != str(state.key[1][0]):
                    yield current
            return
        if state.key is None:
            return  # inserted or deleted by this flush: it had no other id
        yield self._old_id(state)

    def _old_id(self, state: InstanceState) -> Hashable:
        """The id ``user_id`` gave before this flush's changes (a rotated token, say).

        Computed on a transient copy holding the committed column values; raises when
        a changed column's old value was never loaded (set while expired), so the
        caller falls back to invalidating everyone.
        """
        attrs = state.attrs
        if self._id_attribute is not None:
            history = attrs[self._id_attribute].history
            if not history.has_changes():
                return self._id(state)
            if history.deleted:
                return history.deleted[0]
            raise LookupError(f"the old {self._id_attribute} was not loaded")
        old: dict[str, Any] = {}
        changed = False
        for key in self._columns_of(state.mapper):
            history = attrs[key].history  # PASSIVE_NO_INITIALIZE: never loads anything
            if history.deleted:
                old[key], changed = history.deleted[0], True
            elif history.unchanged:
                old[key] = history.unchanged[0]
            elif history.added:
                raise LookupError(f"{key} was set while its old value was not loaded")
            else:
                raise LookupError(f"{key} is not loaded")
        if not changed:
            return self._id(state)
        user_id = self._user_id
        assert user_id is not None  # the primary-key case returned above
        copy_ = state.manager.new_instance()
        instance_dict(copy_).update(old)
        return user_id(copy_)

    def _related_changed(self, obj: Any, state: InstanceState, pending: _Pending) -> None:
        """A role changed: exactly its users when only its user collection moved, else all."""
        users: list[Any] = []
        relationships = state.mapper.relationships
        for attr in inspect(obj).attrs:
            history = attr.history  # PASSIVE_NO_INITIALIZE: never loads anything
            if not history.has_changes():
                continue
            prop = relationships.get(attr.key)
            if prop is None or not issubclass(prop.mapper.class_, self.user_model):
                pending.everything = True  # a column, or a link to something else
                return
            users.extend(u for u in (*history.added, *history.deleted) if u is not None)
        pending.ids.update(self._id(instance_state(u)) for u in users)

    def _do_orm_execute(self, orm_state: ORMExecuteState) -> None:
        if orm_state.is_select:
            return  # every SELECT passes here: keep it to one attribute read
        if not (orm_state.is_update or orm_state.is_delete or orm_state.is_insert):
            return
        for mapper in orm_state.all_mappers:
            if issubclass(mapper.class_, self._watched):
                # Which rows a bulk statement hits is known only to the database.
                self._pending(orm_state.session).everything = True
                return

    def _after_commit(self, session: Session) -> None:
        if session.in_nested_transaction():
            return  # a savepoint released: its changes wait for the outer commit
        pending = session.info.pop(self, None)
        if pending is None:
            return
        if pending.everything:
            self._apply(self.user_cache.invalidate_all)
        else:
            for user_id in pending.ids:
                self._apply(self.user_cache.invalidate, user_id)

    def _after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        # A rolled-back savepoint keeps its changes pending (at worst one extra reload);
        # the outermost transaction ending without after_commit (rollback, close)
        # drops them: nothing it wrote is in the database.
        if transaction.parent is None and not transaction.nested:
            session.info.pop(self, None)
            session.info.pop(self._txn_key, None)

    def _apply(self, invalidate: Callable[..., None], *args: Any) -> None:
        # The database has committed: raising now would report a failed commit that
        # did not fail. The version store logs and degrades on its own; log here too.
        try:
            invalidate(*args)
        except Exception:
            what = key_label(str(args[0])) if args else key_label(None)
            log.exception("identity cache invalidation of %s after commit failed", what)

    # -- lifecycle -----------------------------------------------------------------

    def _install(self) -> None:
        for name, fn in self._listeners:
            event.listen(self._target, name, fn)
        for cls, name, instance_fn in self._instance_listeners:
            event.listen(cls, name, instance_fn, propagate=True, raw=True)
        if self._id_attribute is not None:
            # Make a set of the id attribute load the value it replaces, even when it
            # was expired: that old id must be invalidated too.
            event.listen(getattr(self.user_model, self._id_attribute), "set", _keep, active_history=True)
        self.user_cache.clear()  # raw values stored before binding are not snapshots
        self.user_cache.adapter = self

    def remove(self) -> None:
        """Detach the listeners, unset the adapter and clear the cache. Idempotent.

        With ``user_id=<column name>`` the column keeps the active history SQLAlchemy
        gave it (a set loads the value it replaces); SQLAlchemy cannot turn that off.
        """
        if self._removed:
            return
        self._removed = True
        for name, fn in self._listeners:
            if event.contains(self._target, name, fn):
                event.remove(self._target, name, fn)
        for cls, name, instance_fn in self._instance_listeners:
            if event.contains(cls, name, instance_fn):
                event.remove(cls, name, instance_fn)
        if self._id_attribute is not None:
            attribute = getattr(self.user_model, self._id_attribute)
            if event.contains(attribute, "set", _keep):
                event.remove(attribute, "set", _keep)
        if self.user_cache.adapter is self:
            self.user_cache.adapter = None
        self.user_cache.clear()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "bound"
        return f"<SQLAlchemyBinding {self.user_model.__name__} relationships={self.relationships!r} {state}>"


def bind_sqlalchemy(
    user_cache: UserCache,
    session: Session | sessionmaker | scoped_session,
    user_model: type,
    *,
    relationships: Sequence[str] = (),
    related: Sequence[type] = (),
    user_id: str | Callable[[Any], Hashable] | None = None,
    current_session: Callable[[], Session | None] | None = None,
    wait_for_session: bool = True,
) -> SQLAlchemyBinding:
    """Make ``user_cache`` store SQLAlchemy users safely and invalidate them on commit.

    ``session`` says which sessions are watched for commits and where cache hits go:

    * a ``scoped_session`` -- Flask-SQLAlchemy's ``db.session`` is one: its sessions
      are watched and each hit is added to ``session()``, the session of the
      current request (app context, thread, ...);
    * a ``Session``: that session is watched and receives the hits;
    * a ``sessionmaker``: its sessions are watched; as there is no "current" one,
      hits are detached instances with the ``relationships`` loaded -- what a loader
      that closes its own session returns. Pass ``current_session=`` (a callable
      returning this request's session, e.g. ``lambda: g.db``) to attach them.

    ``relationships`` are loaded before a user is stored and readable without SQL
    on every hit (dotted paths reach further: ``"roles.permissions"``).
    ``related`` lists models whose committed changes invalidate the users linked to
    them; the targets of ``relationships`` are always watched. A change that only
    moves users in and out of a related row's user collection invalidates exactly
    those users; any other change to a related row, and every ORM bulk
    ``update()``/``delete()``/``insert()`` on a watched model, invalidates all. When
    ``relationships`` reach other users (a ``manager``, ``"roles.users"``), any user
    may appear in another user's entry, so every committed change to a user row or to
    a related row invalidates all.

    Cache keys are the ids Flask-Login passes to the loader; by default the user's
    primary key as a string. If your ``get_id()`` returns something else, pass the
    column it returns (``user_id="fs_uniquifier"`` for Flask-Security-Too) or
    ``user_id=lambda user: ...``. A committed change of that id invalidates the old
    value and the new one, so a client still holding the old id (a rotated token) is
    not served from the cache. With a column name the old value is always known
    (setting it loads the value it replaces); with a callable it is computed from the
    committed column values, and when one of them was overwritten without ever being
    loaded the commit invalidates everyone instead.

    With Flask-SQLAlchemy's ``db.session``, a hit in an app context that has no
    session yet does not create one: its rows wait until the request creates it or
    asks a row for its session (:mod:`identity_middleware.deferred_attach`, which
    also lists what the app can still tell apart). ``wait_for_session=False``
    attaches every hit at once instead.
    """
    if not isinstance(wait_for_session, bool):
        raise ConfigError("wait_for_session", wait_for_session, "True or False")
    target, current = _resolve_session(session, current_session)
    mapper = _mapper_of(user_model, "user_model")
    if user_id is None and len(mapper.primary_key) != 1:
        raise ConfigError(
            "user_id", None, f"a callable returning the loader's id: {user_model.__name__} has a composite primary key"
        )
    if isinstance(user_id, str):
        if user_id not in {p.key for p in mapper.column_attrs}:
            raise ConfigError("user_id", user_id, f"a column attribute of {user_model.__name__} or a callable")
    elif user_id is not None and not callable(user_id):
        raise ConfigError("user_id", user_id, "a column attribute name or a callable taking a user and returning its loader id")
    relationships = tuple(relationships)
    tree, targets = _relationship_tree(mapper, relationships)
    related = tuple(related)
    for model in related:
        _mapper_of(model, "related")
    watched = tuple(dict.fromkeys((*related, *targets)))
    if getattr(user_cache, "adapter", None) is not None:
        raise ConfigError(
            "user_cache.adapter", user_cache.adapter, "None: this cache is already bound; remove() that binding first"
        )
    binding = SQLAlchemyBinding(
        user_cache, target, current, user_model, tree, relationships, related, watched, user_id
    )
    binding._wait = wait_for_session
    binding._install()
    return binding


def _attach_rows(session: Session, states: Sequence[InstanceState]) -> None:
    """``Session.add`` for rows a hit built and made detached, minus its cascade walk.

    What ``Session._update_impl`` does for each (the session's autobegin, the
    ``before_attach`` event, the identity map, the ``after_attach`` and
    ``detached_to_persistent`` events, in that order per row), with the checks it
    makes per row left out because a new instance passes them all: it has a key,
    is alive (``states`` belongs to rows the caller holds), unmodified, in no
    session and not deleted. :func:`private_attach_problem` compares the result
    with ``Session.add`` before hits use it.
    """
    session._autobegin_t()  # type: ignore[attr-defined]  # once for all rows, as the first row's add does
    dispatch = session.dispatch
    before_attach, after_attach = dispatch.before_attach, dispatch.after_attach
    detached_to_persistent = dispatch.detached_to_persistent
    add = session.identity_map.add
    session_id = session.hash_key
    for state in states:
        before_attach(session, state)
        add(state)  # refuses a second row with the same key, as Session.add would
        state.session_id = session_id
        after_attach(session, state)
        detached_to_persistent(session, state)


def _set_loaded(state: InstanceState, dict_: dict[str, Any], impl: Any, value: Any) -> None:
    """``set_committed_value`` for a relationship of an instance a hit just created,
    minus what such an instance cannot need: committing history it does not have
    (``InstanceState._commit``) and replaying appends made before the relationship
    was loaded (it never was). For a collection this is what the ORM's loaders do:
    a new collection through the attribute's own factory and events, filled without
    events. :func:`private_attach_problem` compares the result with
    ``set_committed_value`` for every relationship a binding snapshots."""
    if impl.collection:
        adapter, collection = impl._initialize_collection(state)
        if value:
            adapter.append_multiple_without_event(value)
        dict_[impl.key] = collection
    else:
        dict_[impl.key] = value


def _unchecked(session: Session, states: Sequence[InstanceState]) -> None:
    raise AssertionError("placeholder: SQLAlchemyBinding._choose_attach replaces it")


def _to_detached(state: InstanceState, key: tuple, unloaded: tuple[str, ...]) -> None:
    """``make_transient_to_detached`` for a new instance whose identity key and missing
    attributes are known: what it does, minus computing them (and minus resetting the
    history of a state that has none yet)."""
    state.key = key
    if unloaded:  # a row with nothing to expire gets no "expire" event, as a loaded row gets none
        state._expire_attributes(state.dict, unloaded)  # marks them expired, fires "expire"


def _announce_loaded(states: Iterable[InstanceState]) -> None:
    """Fire each built row's ``load`` event, as the query that loaded it would have.

    A hit's rows are built, not loaded, but code runs on load that the app
    relies on: the ORM calls a model's ``@reconstructor`` (the documented place to
    set up non-persistent attributes) and ``sqlalchemy.ext.mutable`` starts
    tracking ``MutableDict``/``MutableList`` values there (without it an in-place
    change is silently dropped at commit). The rows are in the session by now,
    as a query's are when it fires the event. No query ran, so listeners get
    ``None`` for its context.
    """
    for state in states:
        listeners = state.manager.dispatch.load
        if listeners:
            listeners(state, None)


def private_attach_problem(model: type, relationships: Sequence[str] = ()) -> str | None:
    """Why hits cannot use the private seams with this SQLAlchemy, or None if they can.

    Builds rows of ``model`` with a probe key twice, once the public way
    (``make_transient_to_detached`` and ``Session.add``), once as a hit does
    (:func:`_to_detached` and :func:`_attach_rows`), each in a scratch session
    that has no database, and requires the same outcome: the detached state (key,
    expired attributes, clean history), then the persistent one (every attribute
    of the state but the session it names, the identity map, the session's
    bookkeeping, its transaction, the attach events in order), and ``close``
    detaching the row again. For each of ``relationships`` (as passed to
    :func:`bind_sqlalchemy`) it sets a probe row's relationship with
    ``set_committed_value`` and with :func:`_set_loaded` and requires the same
    state, collection and history.
    """
    mapper = _mapper_of(model, "user_model")
    try:
        configure_mappers()  # as the first query would (idempotent): the probes need relationships set up
        public, obj = _probe_row(mapper), _probe_row(mapper)
        make_transient_to_detached(public)
        state, expected = instance_state(obj), instance_state(public)
        _to_detached(state, mapper.identity_key_from_primary_key(_probe_key(mapper)), tuple(state.unloaded))
        mine, theirs = _detached_view(state), _detached_view(expected)
        if mine != theirs:
            return f"a detached row built without make_transient_to_detached differs: {mine!r} != {theirs!r}"
        theirs_session, my_session = Session(), Session()
        try:
            events: dict[Session, list[str]] = {theirs_session: [], my_session: []}
            for session, seen in events.items():
                for name in ("before_attach", "after_attach", "detached_to_persistent"):
                    event.listen(session, name, lambda session, target, name=name, seen=seen: seen.append(name))
            theirs_session.add(public)
            _attach_rows(my_session, [state])
            names = _state_fields(state, expected) - {"session_id", "_instance_dict", "_strong_obj"}
            mine = _attached_view(my_session, state, names, events[my_session])
            theirs = _attached_view(theirs_session, expected, names, events[theirs_session])
            if mine != theirs or not state.persistent:
                return f"a row attached without Session.add differs: {mine!r} != {theirs!r}"
        finally:
            theirs_session.close()
            my_session.close()
        if not state.detached:
            return "Session.close no longer detaches rows attached without Session.add"
        tree, _ = _relationship_tree(mapper, tuple(relationships))
        for owner, prop in dict.fromkeys(_edges(mapper, tree)):
            problem = _set_loaded_problem(owner, prop)
            if problem is not None:
                return problem
    except Exception as exc:  # any surprise means: use the public path
        return f"building a {mapper.class_.__name__} as a hit does failed: {exc!r}"
    return None


def _set_loaded_problem(owner: Mapper, prop: Any) -> str | None:
    """Why :func:`_set_loaded` differs from ``set_committed_value`` for ``prop``, or None."""
    impl = owner.class_manager[prop.key].impl
    public, mine = _probe_row(owner), _probe_row(owner)
    child = _probe_row(prop.mapper, every_column=True)
    set_committed_value(public, prop.key, [child] if prop.uselist else child)
    _set_loaded(instance_state(mine), instance_dict(mine), impl, [child] if prop.uselist else child)
    names = _state_fields(instance_state(mine), instance_state(public))
    theirs_view, mine_view = _loaded_view(public, impl, names), _loaded_view(mine, impl, names)
    if mine_view != theirs_view:
        return (
            f"{owner.class_.__name__}.{prop.key} set without set_committed_value differs: "
            f"{mine_view!r} != {theirs_view!r}"
        )
    return None


_MISSING = object()


def _detached_view(state: InstanceState) -> tuple:
    return (state.key, set(state.expired_attributes), dict(state.committed_state), state.modified, state.expired)


def _state_fields(*states: InstanceState) -> set[str]:
    """Every attribute either state holds in its ``__dict__``; compared by the value it
    reads as, since one may hold a default or a memoized value the other computes on access."""
    return set().union(*(vars(state) for state in states))


def _loaded_view(obj: Any, impl: Any, names: Iterable[str]) -> tuple:
    """A probe row's state after one relationship was set, in terms that do not name the row."""
    state = instance_state(obj)
    fields = {name: getattr(state, name, _MISSING) for name in sorted(names)}
    loaded = state.dict[impl.key]
    adapter = getattr(loaded, "_sa_adapter", None) if impl.collection else None
    return (
        _detached_view(state),
        fields,
        type(loaded),
        list(adapter) if adapter is not None else loaded,
        None if adapter is None else (adapter.attr is impl, adapter.owner_state is state, adapter.data is loaded),
        None if adapter is None else (adapter.invalidated, adapter.empty),
        tuple(impl.get_history(state, state.dict)),
        sorted(state.unloaded),
    )


def _attached_view(session: Session, state: InstanceState, names: Iterable[str], events: list[str]) -> tuple:
    """What attaching ``state`` to ``session`` changed, in terms that do not name either."""
    obj = state.obj()
    transaction = session.get_transaction()
    return (
        _detached_view(state),
        state.persistent,
        {name: getattr(state, name, _MISSING) for name in sorted(names)},
        getattr(state, "_strong_obj", None) is obj,
        state.key is not None and session.identity_map.get(state.key) is obj,
        list(session.identity_map.keys()) == [state.key],
        obj in session,
        (list(session.new), list(session.dirty), list(session.deleted)),
        # the session's own attributes, by name and size, so that new bookkeeping shows
        sorted((name, len(value) if isinstance(value, (dict, set, list)) else None) for name, value in vars(session).items()),
        None if transaction is None else (transaction.origin, transaction.nested, transaction.is_active),
        events,
    )


def _distinct_keys(node: _Node, seen: set[tuple]) -> bool:
    """Whether no identity occurs twice in the snapshot below ``node`` (``seen`` collects them)."""
    if node.key in seen:
        return False
    seen.add(node.key)
    for _, many, child, _ in node.children:
        for item in child if many else () if child is None else (child,):
            if not _distinct_keys(item, seen):
                return False
    return True


def _probe_key(mapper: Mapper) -> tuple:
    return tuple(_probe_value(column) for column in mapper.primary_key)


def _probe_row(mapper: Mapper, *, every_column: bool = False) -> Any:
    """A new instance with its primary key (or every column) set, for a row that never
    reaches a database."""
    obj = mapper.class_manager.new_instance()
    dict_ = instance_dict(obj)
    for column, value in zip(mapper.primary_key, _probe_key(mapper), strict=True):
        dict_[mapper.get_property_by_column(column).key] = value
    if every_column:  # a collection keyed by an attribute needs it on its members
        for prop in mapper.column_attrs:
            dict_.setdefault(prop.key, _probe_value(prop.columns[0]))
    return obj


def _edges(mapper: Mapper, tree: Mapping[str, dict]) -> Iterable[tuple[Mapper, Any]]:
    """(owning mapper, relationship) for every relationship of ``tree``."""
    for name, subtree in tree.items():
        prop = mapper.relationships[name]
        yield mapper, prop
        yield from _edges(prop.mapper, subtree)


def _probe_value(column: Any) -> Any:
    """A primary-key value of the column's Python type, for a row that never reaches a database."""
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return 1
    if kind is str:
        return "probe"
    if kind is uuid.UUID:
        return uuid.UUID(int=1)
    return 1


def _resolve_session(
    session: Any, current_session: Callable[[], Session | None] | None
) -> tuple[Any, Callable[[], Session | None] | None]:
    """The event target that scopes our listeners, and how to find the current session."""
    if current_session is not None and not callable(current_session):
        raise TypeError(f"current_session must be a callable returning a Session, not {current_session!r}")
    if isinstance(session, scoped_session):
        factory = session.session_factory
        if not isinstance(factory, sessionmaker):
            raise TypeError(
                "bind_sqlalchemy needs a scoped_session built on a sessionmaker, so that its listeners "
                f"are scoped to that factory's sessions; got session_factory={factory!r}"
            )
        return session, current_session or session
    if isinstance(session, sessionmaker):
        return session, current_session
    if isinstance(session, Session):
        return session, current_session or (lambda: session)
    raise TypeError(
        "bind_sqlalchemy(session=...) takes a Session, a sessionmaker, a scoped_session or "
        f"Flask-SQLAlchemy's db.session, not {session!r}; to attach hits to a session of your own, "
        "pass the sessionmaker and current_session=<callable returning the request's session>"
    )


def _mapper_of(model: Any, name: str) -> Mapper:
    try:
        mapper = inspect(model)
    except NoInspectionAvailable:
        mapper = None
    if not isinstance(mapper, Mapper) or not isinstance(model, type):
        raise ConfigError(name, model, "a mapped SQLAlchemy class")
    return mapper


def _cascades(mapper: Mapper, tree: Mapping[str, dict], cascade: str) -> bool:
    """True when every relationship of ``tree`` (below ``mapper``) has ``cascade``."""
    for name, subtree in tree.items():
        prop = mapper.relationships[name]
        if cascade not in prop.cascade or not _cascades(prop.mapper, subtree, cascade):
            return False
    return True


def _relationship_tree(mapper: Mapper, paths: tuple[str, ...]) -> tuple[dict[str, dict], list[type]]:
    """``("roles", "roles.permissions")`` -> ``{"roles": {"permissions": {}}}``, checked."""
    tree: dict[str, dict] = {}
    targets: list[type] = []
    for path in paths:
        if not isinstance(path, str) or not path:
            raise ConfigError("relationships", path, "relationship names such as 'roles' or 'roles.permissions'")
        level, here = tree, mapper
        for name in path.split("."):
            prop = here.relationships.get(name)
            if prop is None:
                known = ", ".join(sorted(here.relationships.keys())) or "none"
                raise ConfigError(
                    "relationships", path, f"a relationship of {here.class_.__name__} (it has: {known})"
                )
            if prop.lazy in _UNLOADABLE:
                raise ConfigError(
                    "relationships", path, f"a relationship that can be loaded and held (lazy={prop.lazy!r} cannot)"
                )
            level = level.setdefault(name, {})
            here = prop.mapper
            targets.append(here.class_)
    return tree, targets


def _members(collection: Any) -> Iterable[Any]:
    """The rows in a loaded collection: its values, also for a dict keyed by an attribute."""
    return collection_adapter(collection)


def _keep(target: Any, value: Any, oldvalue: Any, initiator: Any) -> Any:
    """A no-op ``set`` listener; registered with ``active_history`` for what that does."""
    return value


def _names_in(tree: Mapping[str, dict]) -> Iterable[str]:
    for name, subtree in tree.items():
        yield name
        yield from _names_in(subtree)


def _targets_of(mapper: Mapper, tree: Mapping[str, dict]) -> Iterable[type]:
    for name, subtree in tree.items():
        target = mapper.relationships[name].mapper
        yield target.class_
        yield from _targets_of(target, subtree)
