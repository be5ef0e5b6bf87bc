-- xaps-push.lua — Dovecot push_notification Lua driver for xaps-proxy (--watch events).
--
-- On new mail it POSTs one JSON object per mailbox per transaction to xaps-proxy's events
-- listener:
--   {"user":"alice","event":"MessageNew","mailbox":"Work","uid":7,"uidvalidity":1795439300,
--    "messages":1,"from":"…","subject":"…"}
-- event is "MessageNew" (LDA/LMTP delivery) or "MessageAppend" (IMAP APPEND, COPY into a
-- mailbox); uid is the highest new UID of that mailbox in the transaction and "messages" how
-- many new messages it got (a COPY of 500 messages makes one request, not 500).
--
-- Settings (plugin { } section; see 95-xaps-push.conf):
--   xaps_push_url           the listener, e.g. http://127.0.0.1:8425/events (required)
--   xaps_push_secret        the shared secret (--events-secret-file), sent as
--                           "Authorization: Bearer …"; may be "<file" in dovecot.conf
--   xaps_push_timeout_msecs whole-request timeout (default 2000)
--   push_lua_url / push_lua_token are read when the xaps_push_* names are unset (older configs).
--
-- The request runs synchronously inside the delivery (Dovecot's Lua HTTP client has no
-- asynchronous mode), so it is kept short: one attempt, a 2 s timeout, and xaps-proxy answers
-- "Expect: 100-continue" (which Dovecot sends with every payload) and 202 at once. After a
-- timeout, a long-lived process (imap) stops posting for 10 s rather than slowing every APPEND.
-- Failures are logged with dovecot.i_error and never fail the delivery.
--
-- Lua 5.3/5.4 (Debian 12 links 5.4): UIDs arrive as floats; they are printed with %d after
-- math.tointeger, or JSON would say 7.0.

local DEFAULT_TIMEOUT_MSECS = 2000
local BACKOFF_SECS = 10
local MAX_TEXT_BYTES = 200

local client = nil
local client_timeout = nil
local skip_until = 0

-- ------------------------------------------------------------------------- JSON ----

local ESCAPES = {
  ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
  ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t',
}

local function json_string(s)
  s = tostring(s or "")
  s = s:gsub('[%c"\\]', function(c)
    return ESCAPES[c] or string.format("\\u%04x", c:byte())
  end)
  return '"' .. s .. '"'
end

local function json_int(n)
  n = tonumber(n)
  if n == nil then
    return "0"
  end
  if math.tointeger ~= nil then
    local i = math.tointeger(n)
    if i ~= nil then
      return string.format("%d", i)
    end
  end
  return string.format("%.0f", n)
end

-- At most max bytes, never splitting a UTF-8 sequence.
local function truncate_utf8(s, max)
  s = tostring(s or "")
  if #s <= max then
    return s
  end
  local cut = max
  while cut > 0 do
    local b = s:byte(cut + 1)
    if b == nil or b < 0x80 or b >= 0xC0 then
      break
    end
    cut = cut - 1
  end
  return s:sub(1, cut)
end

local function trim(s)
  return (tostring(s or ""):gsub("^%s+", ""):gsub("%s+$", ""))
end

-- --------------------------------------------------------------------- settings ----

local function setting(user, name, legacy)
  local v = user:plugin_getenv(name)
  if (v == nil or v == "") and legacy ~= nil then
    v = user:plugin_getenv(legacy)
  end
  return trim(v)
end

local function http_client(timeout)
  if client == nil or client_timeout ~= timeout then
    client = dovecot.http.client({
      user_agent = "xaps-push.lua",
      max_attempts = 1,
      max_connect_attempts = 1,
      no_auto_retry = true,
      connect_timeout_msecs = timeout,
      request_timeout_msecs = timeout,
      request_absolute_timeout_msecs = timeout,
    })
    client_timeout = timeout
  end
  return client
end

-- ------------------------------------------------------------------------ hooks ----

function script_init()
  if dovecot == nil or dovecot.http == nil or dovecot.http.client == nil then
    -- Too old a Dovecot (dovecot.http came with 2.3.15): log, and never post.
    dovecot.i_error("xaps-push.lua: this Dovecot has no dovecot.http client; events are not sent")
  end
  return 0
end

function script_deinit()
end

function dovecot_lua_notify_begin_txn(user)
  local timeout = tonumber(setting(user, "xaps_push_timeout_msecs", nil)) or DEFAULT_TIMEOUT_MSECS
  if timeout < 100 then
    timeout = 100
  end
  return {
    user = user.username,
    url = setting(user, "xaps_push_url", "push_lua_url"),
    secret = setting(user, "xaps_push_secret", "push_lua_token"),
    timeout = math.floor(timeout),
    order = {},   -- mailbox names in the order they first changed
    boxes = {},   -- mailbox -> { event, uid, uid_validity, count, from, subject }
  }
end

local function remember(ctx, e)
  local name = e.mailbox
  if name == nil then
    return
  end
  local box = ctx.boxes[name]
  if box == nil then
    box = { count = 0, uid = 0 }
    ctx.boxes[name] = box
    table.insert(ctx.order, name)
  end
  box.count = box.count + 1
  local uid = tonumber(e.uid) or 0
  if uid >= box.uid then
    box.event = e.name
    box.uid = uid
    box.uid_validity = e.uid_validity
    box.from = e.from
    box.subject = e.subject
  end
end

-- Only these two hooks are defined: Dovecot then tracks no flag or expunge events at all.
function dovecot_lua_notify_event_message_new(ctx, e)
  remember(ctx, e)
end

function dovecot_lua_notify_event_message_append(ctx, e)
  remember(ctx, e)
end

local function post(ctx, name, box)
  local body = '{"user":' .. json_string(ctx.user) ..
    ',"event":' .. json_string(box.event) ..
    ',"mailbox":' .. json_string(name) ..
    ',"uid":' .. json_int(box.uid) ..
    ',"uidvalidity":' .. json_int(box.uid_validity) ..
    ',"messages":' .. json_int(box.count) ..
    ',"from":' .. json_string(truncate_utf8(box.from, MAX_TEXT_BYTES)) ..
    ',"subject":' .. json_string(truncate_utf8(box.subject, MAX_TEXT_BYTES)) .. '}'
  local req = http_client(ctx.timeout):request({ url = ctx.url, method = "POST" })
  req:add_header("Content-Type", "application/json")
  if ctx.secret ~= "" then
    req:add_header("Authorization", "Bearer " .. ctx.secret)
  end
  req:set_payload(body)
  local resp = req:submit()
  return resp:status(), resp:reason()
end

function dovecot_lua_notify_end_txn(ctx, success)
  if not success or #ctx.order == 0 then
    return
  end
  if ctx.url == "" then
    dovecot.i_error("xaps-push.lua: xaps_push_url is not set; new mail of " .. tostring(ctx.user) .. " not reported")
    return
  end
  if dovecot.http == nil then
    return
  end
  if os.time() < skip_until then
    return
  end
  for _, name in ipairs(ctx.order) do
    local ok, status, reason = pcall(post, ctx, name, ctx.boxes[name])
    if not ok then
      dovecot.i_error("xaps-push.lua: " .. tostring(status))
      return
    end
    if status < 200 or status > 299 then
      dovecot.i_error("xaps-push.lua: HTTP " .. tostring(status) .. " " .. tostring(reason) ..
        " from " .. ctx.url .. " for " .. tostring(ctx.user) .. " " .. tostring(name))
      if status >= 9000 then
        -- a transport error (Dovecot's codes are >= 9000): spare the rest of this transaction,
        -- and after a timeout the next BACKOFF_SECS of this process too
        if tostring(reason):lower():find("time", 1, true) ~= nil then
          skip_until = os.time() + BACKOFF_SECS
        end
        return
      end
    end
  end
end
