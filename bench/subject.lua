-- wrk script for every benchmark run that names one subject (bench/gateway.py's `wrk`, the
-- subject in BENCH_SUBJECT): the cases of many subjects run bench/subjects.lua, and wrk's scripted
-- mode alone moved a gateway's CPU per call by about 4 % on Kong's engine (bench/RESULTS.md
-- §0zg), so every case is driven the same way, a request formatted per call.
local subject = os.getenv("BENCH_SUBJECT") or "payer0"
request = function()
  return wrk.format(nil, nil, { ["x-consumer-username"] = subject })
end
