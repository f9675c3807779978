"""The Redis scripts behind every state change of a shared session.

Each runs atomically on the server, so two workers can never both claim a session, never both
write its ``end``, and a worker that lost its lease can never append after someone else ended
the session. All keys of one session share a hash tag (``{id}``), so the scripts also work on a
Redis Cluster.

Keys of a session (``P`` is the prefix, ``ID`` the session id):
- ``P:{ID}:session`` hash: ``state`` (created, running, ended), ``config``, ``created_at``,
  ``started_at``, ``ended_at``, ``end_reason``, ``summary`` (JSON counters), ``last_id``,
  ``last_token`` (the token of the append that wrote it), ``owner`` (the worker running its
  pipeline), ``claim`` (the owner's claim token), ``cancel_requested``.
- ``P:{ID}:events`` stream: entry ``0-N`` is event N (fields ``t`` type, ``d`` JSON data).
- ``P:{ID}:lease`` string with a TTL: while created, the start deadline; while running, the
  owner's lease, refreshed by the owner. Its absence means nobody will write any more.

Keys of a worker (``W`` its worker id), one per worker however many sessions it runs:
- ``P:worker:{W}:cancels`` list of session ids: a DELETE on another worker sets the session's
  ``cancel_requested`` (``CANCEL``) and then pushes the id here; the owner's one cancel task
  blocks on it. Should the push be lost, the owner's next renewal sees the flag (``RENEW``).
"""

from __future__ import annotations

# KEYS: session, events, lease
# ARGV: 1 state the session must be in; 2 owner that must hold it ("" for anyone: then the
# owner field is cleared); 3 "1" if the lease must be gone; 4 this append's unique token;
# 5 event type; 6 event JSON; 7 MAXLEN; 8 summary JSON, 9 end reason, 10 ended_at (for an
# end); 11 retention in ms
# Returns {"ok", id} or {why, detail}.
APPEND = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner', 'last_id', 'last_token')
local state, owner = h[1], h[2]
if not state then return {'missing', 0} end
local last = tonumber(h[3] or '0')
if h[4] == ARGV[4] then
  -- A retry of an append whose reply was lost: it landed already; never add it twice.
  return {'ok', last}
end
if state ~= ARGV[1] then return {'state', state} end
if ARGV[2] ~= '' and owner ~= ARGV[2] then return {'owner', owner or ''} end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return {'leased', 0} end
local id = last + 1
redis.call('HSET', KEYS[1], 'last_id', id, 'last_token', ARGV[4])
if ARGV[2] == '' then redis.call('HSET', KEYS[1], 'owner', '') end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '0-' .. id, 't', ARGV[5], 'd', ARGV[6])
if ARGV[5] == 'end' then
  redis.call('HSET', KEYS[1], 'state', 'ended', 'end_reason', ARGV[9], 'ended_at', ARGV[10],
             'summary', ARGV[8])
  redis.call('DEL', KEYS[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[11])
  redis.call('PEXPIRE', KEYS[2], ARGV[11])
else
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
return {'ok', id}
"""

# KEYS: session, lease
# ARGV: 1 worker id, 2 claim token, 3 lease ms, 4 started_at, 5 key TTL ms while running
# Returns {"ok", config, created_at} or {state, lease exists}.
CLAIM = """
local h = redis.call('HMGET', KEYS[1], 'state', 'config', 'created_at', 'claim')
local state = h[1]
if not state then return {'missing', 0} end
local leased = redis.call('EXISTS', KEYS[2])
if state == 'running' and h[4] == ARGV[2] then
  -- A retry of this very claim whose reply was lost.
  return {'ok', h[2], h[3]}
end
if state ~= 'created' or leased == 0 then return {state, leased} end
redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[1], 'claim', ARGV[2],
           'started_at', ARGV[4])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {'ok', h[2], h[3]}
"""

# KEYS: session, lease, events
# ARGV: 1 worker id, 2 lease ms, 3 key TTL ms, 4 summary JSON, 5 config JSON ("": unchanged)
# Returns 1 (renewed), 2 (renewed, and a cancel was requested: the backstop for a lost push to
# the owner's cancel list), or 0 when this worker no longer owns a running session. The owner
# sends one of these per session, all of its sessions in one pipeline.
RENEW = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner', 'cancel_requested')
if h[1] ~= 'running' or h[2] ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'summary', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'config', ARGV[5]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if h[3] == '1' then return 2 end
return 1
"""

# KEYS: session
# Marks a running session for cancelling; returns {state, owner} (state "missing" for an unknown
# session). The caller then pushes the id to the owner's cancel list: a key of another hash tag,
# so not from inside this script (which would break on a Redis Cluster).
CANCEL = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
local state = h[1]
if not state then return {'missing', ''} end
if state == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return {state, h[2] or ''}
"""
