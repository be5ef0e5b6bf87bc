/**
 * Dovecot push_notification Lua driver that POSTs one JSON object per new message to an HTTP
 * endpoint (xaps-proxy's event webhook). The same script is meant to ship in deploy/.
 *
 * Dovecot settings (2.3, plugins mail_lua notify push_notification push_notification_lua for
 * imap, lda and lmtp):
 *   plugin {
 *     push_notification_driver = lua:file=/path/to/xaps-push.lua
 *     push_lua_url = http://127.0.0.1:PORT/events      # required
 *     push_lua_token = SECRET                           # optional: "Authorization: Bearer SECRET"
 *   }
 *
 * Body: {"user","event","mailbox","uid","uidvalidity","from","subject"}; event is "MessageNew"
 * (LDA/LMTP delivery) or "MessageAppend" (IMAP APPEND/COPY into a mailbox).
 */
export const PUSH_LUA_SCRIPT = `-- xaps-push.lua: Dovecot push_notification Lua driver for xaps-proxy.
-- POSTs {"user","event","mailbox","uid","uidvalidity","from","subject"} as JSON to push_lua_url
-- for every MessageNew (delivery) and MessageAppend (IMAP APPEND) event.
-- Settings (plugin section): push_lua_url (required), push_lua_token (optional bearer token).

local function json_string(s)
  s = tostring(s or "")
  s = s:gsub('[%c"\\\\]', function(c) return string.format("\\\\u%04x", c:byte()) end)
  return '"' .. s .. '"'
end

local function json_int(n)
  return string.format("%d", math.tointeger(n) or 0)
end

local client

function script_init()
  client = dovecot.http.client({ timeout = 5000, max_attempts = 1 })
  return 0
end

function script_deinit()
end

function dovecot_lua_notify_begin_txn(user)
  return {
    user = user.username,
    url = user:plugin_getenv("push_lua_url"),
    token = user:plugin_getenv("push_lua_token"),
    messages = {},
  }
end

function dovecot_lua_notify_event_message_new(ctx, event)
  table.insert(ctx.messages, event)
end

function dovecot_lua_notify_event_message_append(ctx, event)
  table.insert(ctx.messages, event)
end

function dovecot_lua_notify_end_txn(ctx, success)
  if not success or ctx.url == nil or ctx.url == "" then
    return
  end
  for _, e in ipairs(ctx.messages) do
    local body = '{"user":' .. json_string(ctx.user) ..
      ',"event":' .. json_string(e.name) ..
      ',"mailbox":' .. json_string(e.mailbox) ..
      ',"uid":' .. json_int(e.uid) ..
      ',"uidvalidity":' .. json_int(e.uid_validity) ..
      ',"from":' .. json_string(e.from) ..
      ',"subject":' .. json_string(e.subject) .. '}'
    local req = client:request({ url = ctx.url, method = "POST" })
    req:add_header("content-type", "application/json")
    if ctx.token ~= nil and ctx.token ~= "" then
      req:add_header("authorization", "Bearer " .. ctx.token)
    end
    req:set_payload(body)
    local resp = req:submit()
    local status = resp:status()
    if status < 200 or status > 299 then
      dovecot.i_error("xaps-push.lua: HTTP " .. tostring(status) .. " from " .. ctx.url ..
        " for " .. ctx.user .. " " .. tostring(e.mailbox))
    end
  end
end
`;
