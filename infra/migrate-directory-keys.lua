-- Moves a single-Redis directory written by a build before hash-tagged keys to the current
-- layout (docs/operations.md, "Running on a Redis Cluster"). Run once with every gateway and
-- cell stopped:
--   redis-cli -u redis://DIR:6379 --eval infra/migrate-directory-keys.lua
-- Returns how many workspaces it moved; a second run moves nothing. Keys already in the new
-- layout are left as they are. Presence keys are not moved: the gateways' next refresh
-- rebuilds presence, and the old keys expire by themselves.
local moved = 0
for _, key in ipairs(redis.call('KEYS', 'confab:ws:*')) do
  if not string.find(key, '{', 1, true) then
    local id = string.sub(key, string.len('confab:ws:') + 1)
    local raw = redis.call('GET', key)
    if redis.call('RENAMENX', key, 'confab:ws:{' .. id .. '}') == 1 then
      local ok, record = pcall(cjson.decode, raw)
      if ok and type(record['cell']) == 'string' then
        if redis.call('HSETNX', 'confab:{cells}:placement', id, record['cell']) == 1 then
          redis.call('HINCRBY', 'confab:{cells}:counts', record['cell'], 1)
        end
      end
      moved = moved + 1
    end
  end
end
for _, key in ipairs(redis.call('KEYS', 'confab:move:*')) do
  if not string.find(key, '{', 1, true) then
    local id = string.sub(key, string.len('confab:move:') + 1)
    redis.call('RENAMENX', key, 'confab:move:{' .. id .. '}')
  end
end
for _, id in ipairs(redis.call('SMEMBERS', 'confab:cells')) do
  if redis.call('EXISTS', 'confab:cell:' .. id) == 1 then
    redis.call('RENAMENX', 'confab:cell:' .. id, 'confab:{cells}:cell:' .. id)
  end
  redis.call('SADD', 'confab:{cells}:ids', id)
end
redis.call('DEL', 'confab:cells', 'confab:cellws', 'confab:presence:users')
return moved
