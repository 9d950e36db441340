"""The storage manager's dispatcher daemon (``sm-dispatcher``) and ``smctl``.

The daemon receives XML-RPC calls over HTTP POST on a Unix socket (default
``<run_dir>/sm-dispatcher.sock``) and optionally TCP, runs one plugin process
per call (``<plugins_dir>/<TYPE>SR``, the request on its stdin; forked from a
warm parent of that plugin unless ``--no-warm``) and relays the plugin's
response unchanged.

Modules: ``server`` (HTTP, command line, life cycle), ``core`` (routing,
bounded pool, cancellation), ``child`` (one plugin process), ``routes`` (the
SR -> type table on disk), ``wire`` (safe XML-RPC parsing/marshalling),
``client`` (Python access), ``smctl`` (the command for people).

Endpoints: ``POST /<type>`` sends any method to that type's plugin;
``POST /`` (or ``/RPC2``) routes by the call's ``sr`` (learnt from SR.create /
SR.attach through ``/<type>``); there ``SR.ls`` merges every plugin's answer
and ``Query.query`` lists every plugin's query_result.

Extra methods (any endpoint), beyond the SMAPI:

``Dispatcher.cancel({"dbg": <caller's dbg>, "task": <dbg of a running call>})``
    Cancels every running call whose ``dbg`` is ``task``: its plugin's process
    group gets SIGTERM, then SIGKILL after the grace period
    (``--cancel-grace``), and that call's caller gets
    ``["Cancelled", <task>]`` (unless the plugin still finished with a valid
    response, which is then relayed).  Answers Success, or
    ``["Does_not_exist", "task", <task>]`` if no such call is running.
    A call still waiting for a slot is cancelled without starting.
``Dispatcher.status({"dbg": ...})``
    A struct: plugins, pool slots (workers, share: the most one SR may hold,
    busy, waiting, queues: running and waiting per SR), known SRs, the
    running calls (id, dbg, method, sr, plugin, pids, seconds, cancelled,
    state, timeout: seconds allowed as known now, progress: what, done,
    total, rate, percent, eta), unclaimed outcomes (dbg, method, sr,
    outcome, finished: calls whose reply was lost; a retry of the same call
    gets the kept outcome), the upload spool (dir, used, uploads, limit),
    ``mode`` (warm or exec) and the warm parents (plugin, pid, state, age,
    calls, children, rss, why: what retired it).

Modules beside those: ``pool`` (fair slots per SR), ``budget`` (time per
method), ``calls`` (the running calls), ``fanout``, ``outcomes`` (kept
outcomes for retries), ``upload`` (PUT /data and its spool), ``options``,
``warm`` and ``zygote`` (warm parents forking one child per call),
``install`` (``sm-install-plugins``).
"""
