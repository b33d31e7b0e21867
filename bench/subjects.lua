-- wrk script for bench/gateway.sh case c: every request names one of 10,000 subjects in turn
-- (s0 … s9999), so the filter keeps 10k customers in shared data and syncs them in batches.
-- BENCH_SUBJECTS sets another count (bench/coldstart.py --subjects).
local subjects = tonumber(os.getenv("BENCH_SUBJECTS")) or 10000
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, { ["x-consumer-username"] = "s" .. (n % subjects) })
end
