-- Write a batch of positions in the layout the API reads, in one round trip.
--
-- ARGV[1]: the server time in integer seconds (the score of timestamps*).
-- ARGV[2]: one line per position, "<taxi> <operator> <lon> <lat> <value>\n",
--          where <value> is "<timestamp> <lat> <lon> <status> <device> <version>".
--          geotaxi rejects whitespace in every field, so spaces split safely.
-- ARGV[3]: one line per rejected signature, "<operator> <taxi> <ip>\n".
--
-- Returns {written, failed, first error}. A position whose HSET fails (say a
-- WRONGTYPE key) is counted and skipped rather than failing the batch, since
-- retrying the batch would fail again. Batches stay below 2,500 positions so
-- that unpack() of the variadic arguments fits Lua's stack.
--
-- NOTE: the keys are built here, not passed in KEYS, so this script is not
-- fit for Redis Cluster. The API does not run on a cluster.

local now = ARGV[1]
local geo, geo2, stamps, stamps_id = {}, {}, {}, {}
local written, failed, first_error = 0, 0, ""

for taxi, operator, lon, lat, value in string.gmatch(ARGV[2], "(%S+) (%S+) (%S+) (%S+) ([^\n]+)\n") do
    local reply = redis.pcall("HSET", "taxi:" .. taxi, operator, value)
    if type(reply) == "table" and reply.err then
        failed = failed + 1
        if first_error == "" then first_error = reply.err end
    else
        local member = taxi .. ":" .. operator
        local n = #geo
        geo[n + 1], geo[n + 2], geo[n + 3] = lon, lat, taxi
        geo2[n + 1], geo2[n + 2], geo2[n + 3] = lon, lat, member
        n = #stamps
        stamps[n + 1], stamps[n + 2] = now, member
        stamps_id[n + 1], stamps_id[n + 2] = now, taxi
        written = written + 1
    end
end

if written > 0 then
    for _, command in ipairs({
        {"GEOADD", "geoindex", geo},
        {"GEOADD", "geoindex_2", geo2},
        {"ZADD", "timestamps", stamps},
        {"ZADD", "timestamps_id", stamps_id},
    }) do
        local reply = redis.pcall(command[1], command[2], unpack(command[3]))
        if type(reply) == "table" and reply.err then
            if first_error == "" then first_error = reply.err end
            failed, written = failed + written, 0
        end
    end
end

for operator, taxi, ip in string.gmatch(ARGV[3] or "", "(%S+) (%S+) (%S+)\n") do
    redis.pcall("ZINCRBY", "badhash_operators", 1, operator)
    redis.pcall("ZINCRBY", "badhash_taxis_ids", 1, taxi)
    redis.pcall("ZINCRBY", "badhash_ips", 1, ip)
end

return {written, failed, first_error}
