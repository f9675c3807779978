"""The Redis scripts behind every state change of a shared session.

Each runs atomically on the server, so two workers can never both claim a session, never both
write its ``end``, and a worker that lost its lease can never append after someone else ended
the session. All keys of one session share a hash tag (``{id}``), so the scripts also work on a
Redis Cluster.

Keys of a session (``P`` is the prefix, ``ID`` the session id):
- ``P:{ID}:session`` hash: ``state`` (created, running, ended), ``config``, ``created_at``,
  ``started_at``, ``ended_at``, ``end_reason``, ``summary`` (JSON counters), ``last_id``,
  ``last_token`` (the token of the append that wrote it), ``owner`` (the worker running its
  pipeline), ``claim`` (the owner's claim token), ``cancel_requested``; for a resumable session
  ``journal`` (``ok``, or ``broken`` after a gap), ``input_end`` (the reason its input ended),
  ``adoptions``; and the log's progress, ``p:*`` (``service/events/progress.py``).
- ``P:{ID}:audio`` string: a resumable session's received bytes, its journal (``JOURNAL``), from
  which another worker adopts the session if its owner dies (``ADOPT``).
- ``P:{ID}:events`` stream: entry ``0-N`` is event N (fields ``t`` type, ``d`` JSON data).
- ``P:{ID}:lease`` string with a TTL: while created, the start deadline; while running, the
  owner's lease, refreshed by the owner. Its absence means nobody will write any more.

``P:journaled`` sorted set: resumable sessions by when their lease lapses (ms since the epoch),
updated by their owners' renewals: where every worker's sweep looks for sessions to adopt.

Keys of a worker (``W`` its worker id), one per worker however many sessions it runs:
- ``P:worker:{W}:cancels`` list of session ids: a DELETE on another worker sets the session's
  ``cancel_requested`` (``CANCEL``) and then pushes the id here; the owner's one cancel task
  blocks on it. Should the push be lost, the owner's next renewal sees the flag (``RENEW``).
"""

from __future__ import annotations

# KEYS: session, events, lease, audio
# ARGV: 1 state the session must be in; 2 owner that must hold it ("" for anyone: then the
# owner field is cleared); 3 "1" if the lease must be gone; 4 this append's unique token;
# 5 event type; 6 event JSON; 7 MAXLEN; 8 summary JSON, 9 end reason, 10 ended_at (for an
# end); 11 retention in ms; 12 progress fields to increment (space-separated, may be empty),
# 13 a progress field to set ("" none), 14 its value (service/events/progress.py)
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
for field in string.gmatch(ARGV[12], '%S+') do redis.call('HINCRBY', KEYS[1], field, 1) end
if ARGV[13] ~= '' then redis.call('HSET', KEYS[1], ARGV[13], ARGV[14]) end
if ARGV[5] == 'end' then
  redis.call('HSET', KEYS[1], 'state', 'ended', 'end_reason', ARGV[9], 'ended_at', ARGV[10],
             'summary', ARGV[8])
  redis.call('DEL', KEYS[3], KEYS[4])
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
if cjson.decode(h[2])['resumable'] then
  -- Its received audio is kept (the owner appends it: JOURNAL), so that another worker can
  -- adopt the session should its owner die.
  redis.call('HSET', KEYS[1], 'journal', 'ok')
end
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

# KEYS: session, audio
# ARGV: 1 owner (this worker), 2 the offset of these bytes in the session's input, 3 the bytes,
# 4 the reason the input ended ("" while it goes on), 5 key TTL ms
# Appends a resumable session's received audio to its journal (the string at ``audio``), as the
# owner, at exactly ``offset``: bytes that an earlier attempt landed are not added twice, and a gap
# (bytes the owner could not keep) marks the journal broken, so nobody adopts the session from
# it. Returns {"ok", length}, {"off", why} (not this worker's, or no journal), {"gap", length}.
JOURNAL = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner', 'journal')
if h[1] ~= 'running' or h[2] ~= ARGV[1] then return {'off', h[1] or 'missing'} end
if h[3] ~= 'ok' then return {'off', 'journal ' .. (h[3] or 'none')} end
local have = redis.call('STRLEN', KEYS[2])
local offset = tonumber(ARGV[2])
if have < offset or have > offset + #ARGV[3] then
  redis.call('HSET', KEYS[1], 'journal', 'broken')
  redis.call('DEL', KEYS[2])
  return {'gap', have}
end
if have < offset + #ARGV[3] then
  -- From where the journal ends: an earlier attempt may have landed part of these bytes.
  have = redis.call('APPEND', KEYS[2], string.sub(ARGV[3], have - offset + 1))
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'input_end', ARGV[4]) end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {'ok', have}
"""

# KEYS: session, lease
# ARGV: 1 worker id
# The owner gives a running session up without ending it (it shuts down): its lease goes at
# once, so that another worker adopts it. Returns 1, or 0 if this worker did not own it.
RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if h[1] ~= 'running' or h[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', '')
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: session, lease, audio
# ARGV: 1 worker id, 2 claim token, 3 lease ms, 4 key TTL ms
# Takes over a running resumable session whose owner's lease lapsed: this worker becomes its
# owner (the dead one's late appends are refused, as after ``worker_lost``) and runs its
# pipeline again over the journal. Returns {"ok", journal length, HGETALL...} or {why, detail}:
# "missing", "ended", "leased" (its owner lives), "nojournal" (not resumable, or the journal
# is broken: the session can only end ``worker_lost``).
ADOPT = """
local h = redis.call('HMGET', KEYS[1], 'state', 'journal', 'claim')
if not h[1] then return {'missing', ''} end
if h[3] == ARGV[2] then
  -- A retry of this very adoption whose reply was lost.
  return {'ok', redis.call('STRLEN', KEYS[3]), unpack(redis.call('HGETALL', KEYS[1]))}
end
if h[1] ~= 'running' then return {h[1], ''} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'leased', ''} end
if h[2] ~= 'ok' then return {'nojournal', h[2] or ''} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'claim', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'adoptions', 1)
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'ok', redis.call('STRLEN', KEYS[3]), unpack(redis.call('HGETALL', KEYS[1]))}
"""
