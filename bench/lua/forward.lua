-- Forward form for wrk: every request is absolute-form (`GET http://UPSTREAM/ HTTP/1.1`) with
-- `Proxy-Authorization: Basic base64(connection:token)`, as an HTTP_PROXY client sends it.
-- bench/load.py passes the target and the credentials in the environment.
local target = os.getenv("LK_FORWARD_TARGET")    -- e.g. 127.0.0.1:8081
local auth = os.getenv("LK_FORWARD_AUTH")        -- base64(connection:token)
wrk.method = "GET"
wrk.path = "http://" .. target .. "/"
wrk.headers["Host"] = target
wrk.headers["Proxy-Authorization"] = "Basic " .. auth

local dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(dir .. "report.lua")
