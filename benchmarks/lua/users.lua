-- Every measured request: GET the URL's path with a varying X-User-Id (so a
-- sticky split sends users both ways) and the benchmark's API key (used by
-- candidates that check keys, ignored by the rest). The requests are built
-- once, so the per-request cost in wrk is one table lookup.
local requests = {}
local count = 1000
local index = 0

function init(args)
  for i = 1, count do
    requests[i] = wrk.format(nil, nil, {
      ["X-User-Id"] = tostring(100000 + i * 7919 % 1000003),
      ["X-Api-Key"] = "bench-key-0123456789",
    })
  end
end

function request()
  index = index % count + 1
  return requests[index]
end
