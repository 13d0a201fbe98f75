// phi-session viewer: one page over the read-only JSON API (see web/server.py).
//
// Everything that comes from a session is untrusted. It reaches the page only as
// text: through document.createTextNode / textContent (the `h` helper below) or as
// attribute values we build ourselves. No HTML-parsing sink is used anywhere
// (tests/test_web_api.py checks the source for them).
"use strict";

(() => {
  const app = document.getElementById("app");
  const STATUSES = ["Completed", "Running", "Pending", "Aborted", "Rejected"];
  const ROLE_CLASSES = { user: "msg-user", assistant: "msg-assistant", toolResult: "msg-toolResult" };
  const IMAGE_TYPES = /^image\/(png|jpeg|gif|webp)$/;
  const FILTERS = [
    ["agent", "Agent", "agent id"],
    ["model", "Model", "provider/model"],
    ["since", "Active since", "7d, 24h, 2025-06-01"],
    ["until", "Active before", "RFC 3339 or date"],
  ];

  // -- DOM helpers: text only ---------------------------------------------------------

  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, ...children) {
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function statusClass(status) {
    return "status-" + (STATUSES.includes(status) ? status : "unknown");
  }

  function sessionHref(id, loopId) {
    const base = "#/session/" + encodeURIComponent(id);
    return loopId ? base + "?loop=" + encodeURIComponent(loopId) : base;
  }

  function shortTime(value) {
    if (!value) return "";
    return String(value).replace("T", " ").replace(/(\.\d{3})\d*Z$/, "$1Z");
  }

  function secondsTime(value) {
    return shortTime(value).replace(/\.\d+Z$/, "Z");
  }

  function msTime(ms) {
    const date = new Date(Number(ms));
    return isNaN(date.getTime()) ? String(ms) : date.toISOString().replace("T", " ");
  }

  function tokens(n) {
    return Number(n || 0).toLocaleString("en-US");
  }

  function plural(n, noun) {
    return tokens(n) + " " + noun + (n === 1 ? "" : "s");
  }

  function seconds(start, end) {
    const a = Date.parse(start), b = Date.parse(end);
    return isNaN(a) || isNaN(b) ? "" : ((b - a) / 1000).toFixed(2) + "s";
  }

  function json(value) {
    return JSON.stringify(value, null, 2);
  }

  function addUsage(total, usage) {
    for (const key of ["input", "output", "reasoning", "cache_read", "cache_write", "total_tokens"]) {
      total[key] = (total[key] || 0) + Number((usage || {})[key] || 0);
    }
    return total;
  }

  function usageText(usage) {
    const u = usage || {};
    const parts = [tokens(u.total_tokens) + " tokens", "in " + tokens(u.input), "out " + tokens(u.output)];
    if (u.reasoning) parts.push("reasoning " + tokens(u.reasoning));
    if (u.cache_read) parts.push("cache read " + tokens(u.cache_read));
    if (u.cache_write) parts.push("cache write " + tokens(u.cache_write));
    return parts.join(" · ");
  }

  function statusChips(counts) {
    return STATUSES.concat(Object.keys(counts || {}).filter((s) => !STATUSES.includes(s)))
      .filter((status) => (counts || {})[status])
      .map((status) => h("span", { class: "chip " + statusClass(status) }, counts[status] + " " + status));
  }

  function kindText(kind) {
    if (typeof kind === "string") return kind;
    if (kind && typeof kind === "object") {
      const [name, payload] = Object.entries(kind)[0] || ["?", {}];
      return name + (payload && payload.tag !== undefined ? ":" + payload.tag : "");
    }
    return "Initial";
  }

  async function api(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" } });
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      throw new Error(response.status + " " + response.statusText);
    }
    if (!response.ok) {
      const error = new Error((body && body.error) || response.statusText);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function showError(error) {
    const status = error.status ? error.status + ": " : "";
    return h("p", { class: "error-banner", role: "alert" }, status + error.message);
  }

  // -- routing ------------------------------------------------------------------------

  function parseHash() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, query] = hash.split("?");
    return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || "") };
  }

  let renderToken = 0;

  async function route() {
    const token = ++renderToken;
    let parts = [];
    let params = new URLSearchParams();
    let badHash = null;
    try {
      ({ parts, params } = parseHash());
    } catch (error) {
      // decodeURIComponent throws on a stray "%" (#/session/%E0): show it, don't leave the old page up.
      badHash = new Error("malformed address " + location.hash + ": " + error.message);
    }
    const view = badHash ? "error"
      : parts[0] === "session" && parts[1] !== undefined ? "session" : parts[0] === "stats" ? "stats" : "list";
    for (const link of document.querySelectorAll("[data-nav]")) {
      link.classList.toggle("active", link.dataset.nav === (view === "stats" ? "stats" : "list"));
    }
    const page = h("div", { class: "view view-" + view });
    try {
      if (badHash) throw badHash;
      if (view === "session") await sessionView(page, parts[1], params);
      else if (view === "stats") await statsView(page, params);
      else await listView(page, params);
    } catch (error) {
      append(page, showError(error));
    }
    if (token !== renderToken) return; // a newer navigation won
    clear(app);
    app.appendChild(page);
    const target = page.querySelector(".highlight");
    if (target) target.scrollIntoView({ block: "start" });
  }

  // -- session list ---------------------------------------------------------------------

  function filterForm(params) {
    const field = (name, label, placeholder, extra) =>
      h("label", null, label, h("input", Object.assign({ name, placeholder, value: params.get(name) || "" }, extra || {})));
    const select = (name, label, options) => {
      const element = h("select", { name }, options.map(([value, text]) => h("option", { value }, text)));
      element.value = params.get(name) || "";
      return h("label", null, label, element);
    };
    const form = h(
      "form",
      { class: "filters panel", id: "filters" },
      FILTERS.map(([name, label, placeholder]) => field(name, label, placeholder)),
      select("status", "Loop status", [["", "any"]].concat(STATUSES.map((s) => [s, s]))),
      field("min_tokens", "Min tokens", "0", { class: "narrow", inputmode: "numeric" }),
      field("limit", "Limit", "200", { class: "narrow", inputmode: "numeric" }),
      select("order", "Order", [["", "newest"], ["oldest", "oldest"], ["tokens", "tokens"]]),
      h("button", { type: "submit" }, "Apply"),
      h("button", { type: "button", class: "secondary", onclick: () => { location.hash = "#/"; } }, "Clear"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const query = new URLSearchParams();
      for (const [key, value] of new FormData(form)) if (String(value).trim()) query.set(key, String(value).trim());
      location.hash = "#/" + (query.toString() ? "?" + query : "");
    });
    return form;
  }

  async function listView(page, params) {
    append(page, h("h1", null, "Sessions"), filterForm(params));
    const query = new URLSearchParams(params);
    if (!query.has("limit")) query.set("limit", "200");
    let rows;
    try {
      rows = await api("api/sessions?" + query);
    } catch (error) {
      append(page, showError(error));
      return;
    }
    const limited = rows.length === Number(query.get("limit"));
    append(page, h("p", { class: "muted" }, h("span", { id: "session-count" }, plural(rows.length, "session")),
      limited ? " (the limit: raise it to see more)" : ""));
    if (!rows.length) return;
    const table = h(
      "table",
      { class: "data", id: "sessions" },
      h("thead", null, h("tr", null, ["Session", "Agent", "Created", "Last active", "Loops"].map((t) => h("th", null, t)),
        h("th", { class: "num" }, "Turns"), h("th", { class: "num" }, "Tokens"), h("th", null, "Model"), h("th", null, "Parent"))),
      h("tbody", null, rows.map((row) => h("tr", null,
        h("td", { class: "nowrap" }, h("a", { href: sessionHref(row.session_id), class: "mono session-link" }, row.session_id)),
        h("td", { class: "mono clip", title: row.agent_id }, row.agent_id),
        h("td", { class: "nowrap", title: row.created_at }, secondsTime(row.created_at)),
        h("td", { class: "nowrap", title: row.last_active_at }, secondsTime(row.last_active_at)),
        h("td", null, statusChips(row.loops_by_status), row.rejected ? h("span", { class: "chip rejected" }, "rejected") : null),
        h("td", { class: "num" }, tokens(row.turn_count)),
        h("td", { class: "num" }, tokens(row.total_tokens)),
        h("td", null, (row.models || []).join(", ")),
        h("td", { class: "clip" }, row.parent_session_id
          ? h("a", { href: sessionHref(row.parent_session_id), class: "mono", title: row.parent_session_id },
            row.parent_session_id) : ""),
      ))),
    );
    append(page, h("div", { class: "table-wrap" }, table));
  }

  // -- session page -----------------------------------------------------------------------

  function formationText(formation) {
    const [kind, payload] = Object.entries(formation || {})[0] || ["?", {}];
    let text = kind + " at " + shortTime((payload || {}).timestamp);
    if (kind === "InactivityTimeout") {
      text += " (threshold " + payload.threshold_secs + "s" +
        (payload.previous_session_id ? ", after session " + payload.previous_session_id : "") + ")";
    }
    return text;
  }

  function sessionHeader(session) {
    const total = session.loops.reduce((sum, loop) => addUsage(sum, loop.usage), {});
    const counts = {};
    for (const loop of session.loops) counts[loop.status] = (counts[loop.status] || 0) + 1;
    const spawn = session.parent_spawn_ref;
    const parent = spawn
      ? h("span", { id: "parent-link" }, "spawned by ",
        h("a", { href: sessionHref(spawn.parent_session_id, spawn.parent_loop_id), class: "mono" }, spawn.parent_session_id),
        " via tool ", h("code", null, spawn.tool_name), " (call ", h("code", null, spawn.tool_call_id), ")")
      : h("span", { class: "muted" }, "none (not a sub-agent session)");
    const rows = [
      ["Agent", h("span", { class: "mono" }, session.agent_id)],
      ["Formation", formationText(session.formation)],
      ["Scope", session.scope],
      ["Created", shortTime(session.created_at)],
      ["Last active", shortTime(session.last_active_at)],
      ["Parent", parent],
      ["Rejected", session.rejected ? h("span", { class: "chip rejected" }, "rejected by before_task") : "no"],
      ["Loops", statusChips(counts)],
      ["Usage", usageText(total)],
    ];
    return h("div", { class: "panel" }, h("dl", { class: "kv" }, rows.map(([key, value]) => [h("dt", null, key), h("dd", null, value)])));
  }

  // Loops as a forest following parent_loop_id; a loop in a parent cycle becomes a root.
  function loopForest(loops) {
    const firstIndex = new Map();
    loops.forEach((loop, index) => { if (!firstIndex.has(loop.loop_id)) firstIndex.set(loop.loop_id, index); });
    const children = new Map();
    const roots = [];
    loops.forEach((loop, index) => {
      const parent = loop.parent_loop_id == null ? undefined : firstIndex.get(loop.parent_loop_id);
      if (parent === undefined || parent === index) roots.push(index);
      else children.set(parent, (children.get(parent) || []).concat(index));
    });
    const seen = new Set();
    const build = (index) => {
      seen.add(index);
      return { index, children: (children.get(index) || []).filter((c) => !seen.has(c)).map(build) };
    };
    const forest = roots.map(build);
    loops.forEach((_, index) => { if (!seen.has(index)) forest.push(build(index)); });
    return forest;
  }

  function contentBlock(block) {
    switch (block && block.type) {
      case "text":
        return h("div", { class: "block text" }, block.text);
      case "thinking":
        return h("details", { class: "block thinking" }, h("summary", null, "thinking"), h("div", null, block.thinking));
      case "toolCall":
        return h("div", { class: "block toolcall" },
          h("span", { class: "tool-name" }, "→ " + block.name), " ", h("code", { class: "muted" }, block.id),
          h("pre", null, json(block.arguments)));
      case "image": {
        if (IMAGE_TYPES.test(String(block.mimeType))) {
          const image = h("img", { class: "block image", alt: "image (" + block.mimeType + ")" });
          image.src = "data:" + block.mimeType + ";base64," + String(block.data).replace(/[^A-Za-z0-9+/=]/g, "");
          return image;
        }
        return h("div", { class: "block muted" }, "[image " + block.mimeType + "]");
      }
      default:
        return h("pre", { class: "block" }, json(block));
    }
  }

  function messageView(message) {
    const role = String(message.role);
    const known = Object.prototype.hasOwnProperty.call(ROLE_CLASSES, role);
    const isError = role === "toolResult" && message.isError;
    const head = h("div", { class: "msg-head" }, h("span", { class: "role" }, role));
    const box = h("div", { class: "msg " + (known ? ROLE_CLASSES[role] : "msg-extension") + (isError ? " is-error" : "") }, head);
    if (!known) {
      append(head, h("span", null, String(message.kind)));
      append(box, h("pre", null, json(message.data)));
      return box;
    }
    if (role === "assistant") {
      append(head, h("span", null, message.provider + "/" + message.model), h("span", null, "stop: " + message.stopReason),
        h("span", null, tokens((message.usage || {}).total_tokens) + " tokens"));
    } else if (role === "toolResult") {
      append(head, h("span", null, message.toolName), h("code", null, message.toolCallId),
        isError ? h("span", { class: "chip error" }, "error") : null);
    }
    if (message.timestamp !== undefined) append(head, h("span", null, msTime(message.timestamp)));
    append(box, (message.content || []).map(contentBlock));
    if (message.errorMessage) append(box, h("div", { class: "block chip error" }, message.errorMessage));
    return box;
  }

  function turnSection(title, messages) {
    if (!messages || !messages.length) return null;
    return h("div", { class: "turn-section" }, h("div", { class: "section-title" }, title), messages.map(messageView));
  }

  // phi-core's input_messages also hold the tool results of the turn (it records every
  // message the turn added): each result is shown once, in order, after the assistant
  // output that called the tool; one repeated from the turn before is not shown again.
  function freshInputs(turn, previous) {
    const results = [...(turn.tool_results || []), ...((previous || {}).tool_results || [])];
    const shown = new Set(results.map((message) => message.toolCallId));
    return (turn.input_messages || []).filter((message) => !(message.role === "toolResult" && shown.has(message.toolCallId)));
  }

  function turnView(turn, previous) {
    return h("div", { class: "turn" },
      h("div", { class: "turn-head" },
        h("strong", null, "Turn " + turn.turn_id.turnIndex),
        h("span", null, "triggered by " + turn.triggered_by),
        h("span", null, seconds(turn.started_at, turn.ended_at)),
        h("span", null, usageText(turn.usage))),
      turnSection("Input messages", freshInputs(turn, previous)),
      turnSection("Assistant output", [turn.output_message]),
      turnSection("Tool results", turn.tool_results));
  }

  function configText(config) {
    if (!config) return "none";
    const parts = [config.provider + "/" + config.model];
    for (const [key, label] of [["config_id", "config"], ["name", "name"], ["api", "api"], ["thinking_level", "thinking"],
      ["temperature", "temperature"], ["max_tokens", "max tokens"], ["context_window", "context"]]) {
      if (config[key] !== undefined && config[key] !== null) parts.push(label + " " + config[key]);
    }
    return parts.join(" · ");
  }

  function loopView(session, node, number, elements) {
    const loop = session.loops[node.index];
    const group = loop.parallel_group;
    const tools = (loop.turns || []).reduce((n, turn) => n + (turn.tool_results || []).length, 0);
    const summary = h("summary", null,
      h("span", { class: "muted" }, "#" + number),
      h("span", { class: "chip " + statusClass(loop.status) }, loop.status),
      h("span", { class: "chip kind" }, kindText(loop.continuation_kind)),
      h("span", { class: "loop-id" }, loop.loop_id),
      group ? h("span", { class: "chip " + (group.is_selected ? "winner" : "loser") },
        group.is_selected ? "★ parallel winner" : "parallel, not selected") : null,
      loop.child_loop_refs && loop.child_loop_refs.length ? h("span", { class: "chip kind" }, plural(loop.child_loop_refs.length, "sub-agent")) : null,
      h("span", { class: "loop-stats" },
        [loop.config ? loop.config.provider + "/" + loop.config.model : null, plural((loop.turns || []).length, "turn"),
          plural(tools, "tool call"), tokens((loop.usage || {}).total_tokens) + " tokens"].filter(Boolean).join(" · ")));
    const facts = [
      ["Started", shortTime(loop.started_at)],
      ["Ended", loop.ended_at ? shortTime(loop.ended_at) + " (" + seconds(loop.started_at, loop.ended_at) + ")" : "not ended"],
      ["Config", configText(loop.config)],
      ["Usage", usageText(loop.usage)],
    ];
    if (loop.parent_loop_id) {
      const local = session.loops.some((other) => other.loop_id === loop.parent_loop_id);
      facts.push(["Continues", h("span", { class: "mono" }, loop.parent_loop_id + (local ? "" : " (not in this session)"))]);
    }
    if (loop.rejection != null) facts.push(["Rejection", h("span", { class: "chip rejected" }, loop.rejection)]);
    if (loop.error) facts.push(["Error", h("span", { class: "chip error" }, loop.error)]);
    if (group) {
      facts.push(["Parallel group", h("span", null, plural(group.all_loop_ids.length, "loop") + "; winner ",
        h("span", { class: "mono" }, group.selected_loop_id), " (config #" + group.selected_config_index + "), evaluation " +
        tokens((group.evaluation_usage || {}).total_tokens) + " tokens")]);
    }
    const links = (loop.child_loop_refs || []).map((ref) => h("div", { class: "subagent-link" },
      "→ sub-agent ", h("a", { href: sessionHref(ref.child_session_id, ref.child_loop_id), class: "mono" }, ref.child_session_id),
      " via tool ", h("code", null, ref.tool_name), " (call ", h("code", null, ref.tool_call_id), ")"));
    const body = h("div", { class: "loop-body" },
      h("dl", { class: "kv" }, facts.map(([key, value]) => [h("dt", null, key), h("dd", null, value)])),
      links.length ? h("div", { class: "links" }, links) : null,
      (loop.turns || []).map((turn, index) => turnView(turn, loop.turns[index - 1])),
      (loop.turns || []).length ? null : h("p", { class: "muted" }, "No completed turns."));
    const details = h("details", { class: "loop " + statusClass(loop.status) }, summary, body);
    details.dataset.loopId = loop.loop_id;
    if (!elements.has(loop.loop_id)) elements.set(loop.loop_id, details);
    // Children sit beside the details, not inside: the whole tree shows while loops are closed.
    return h("div", { class: "loop-node" }, details,
      node.children.length ? h("div", { class: "children" }, node.children.map((child) =>
        loopView(session, child, child.index + 1, elements))) : null);
  }

  // The event's own fields on one line, cut short: the full JSON opens below it.
  function eventPreview(event) {
    const rest = Object.assign({}, event);
    for (const key of ["type", "loop_id", "timestamp"]) delete rest[key];
    const text = JSON.stringify(rest);
    return text.length > 140 ? text.slice(0, 139) + "…" : text;
  }

  function eventLog(rows, loops) {
    const numbers = new Map();
    loops.forEach((loop, index) => { if (!numbers.has(loop.loop_id)) numbers.set(loop.loop_id, index + 1); });
    return h("div", { class: "table-wrap" }, h("table", { class: "data event-log", id: "event-log" },
      h("thead", null, h("tr", null, h("th", null, "Loop"), h("th", { class: "num" }, "Seq"), h("th", null, "Type"),
        h("th", null, "Time"), h("th", null, "Event"))),
      h("tbody", null, rows.map((row) => h("tr", null,
        h("td", null, row.loop_id === null ? "session" : "#" + numbers.get(row.loop_id)),
        h("td", { class: "num" }, row.sequence === null ? "" : row.sequence),
        h("td", null, String(row.event.type)),
        h("td", { class: "nowrap" }, shortTime(row.event.timestamp)),
        h("td", { class: "event-cell" }, h("details", null, h("summary", { class: "muted" }, eventPreview(row.event)),
          h("pre", null, json(row.event)))),
      )))));
  }

  async function sessionView(page, id, params) {
    const session = await api("api/sessions/" + encodeURIComponent(id));
    const focus = params.get("loop");
    append(page,
      h("p", null, h("a", { href: "#/" }, "← all sessions")),
      h("h1", null, "Session ", h("span", { class: "mono" }, session.session_id)),
      sessionHeader(session));
    const elements = new Map();
    const tree = h("div", { class: "loop-tree", id: "loop-tree" },
      loopForest(session.loops).map((node) => loopView(session, node, node.index + 1, elements)));
    const target = focus && elements.get(focus);
    if (target) {
      target.classList.add("highlight");
      target.open = true;
    }
    const logHolder = h("div", { id: "event-log-holder" });
    const toggle = h("button", { type: "button", class: "secondary", id: "show-events" }, "Show raw event log");
    toggle.addEventListener("click", async () => {
      if (logHolder.firstChild) {
        clear(logHolder);
        toggle.textContent = "Show raw event log";
        return;
      }
      toggle.disabled = true;
      try {
        append(logHolder, eventLog(await api("api/sessions/" + encodeURIComponent(id) + "/events"), session.loops));
        toggle.textContent = "Hide raw event log";
      } catch (error) {
        append(logHolder, showError(error));
      } finally {
        toggle.disabled = false;
      }
    });
    const expandAll = h("button", { type: "button", class: "secondary", onclick: () => {
      for (const details of tree.querySelectorAll("details.loop")) details.open = true;
    } }, "Expand all loops");
    append(page,
      h("h2", null, "Loops"),
      h("div", { class: "toolbar" }, expandAll,
        h("a", { href: "api/sessions/" + encodeURIComponent(id), target: "_blank", rel: "noopener" }, "phi-core JSON")),
      tree,
      h("h2", null, "Event log"),
      h("div", { class: "toolbar" }, toggle),
      logHolder);
  }

  // -- usage ---------------------------------------------------------------------------

  async function statsView(page, params) {
    const by = params.get("by") || "agent";
    const select = h("select", { name: "by", id: "stats-by" },
      ["agent", "model", "day"].map((value) => h("option", { value }, "by " + value)));
    select.value = by;
    select.addEventListener("change", () => { location.hash = "#/stats?by=" + encodeURIComponent(select.value); });
    append(page, h("h1", null, "Usage"), h("div", { class: "toolbar" }, select));
    const rows = await api("api/stats?by=" + encodeURIComponent(by));
    const columns = ["input", "output", "reasoning", "cache_read", "cache_write", "total_tokens"];
    append(page, h("div", { class: "table-wrap" }, h("table", { class: "data", id: "stats" },
      h("thead", null, h("tr", null, h("th", null, by), h("th", { class: "num" }, "Sessions"), h("th", { class: "num" }, "Loops"),
        columns.map((c) => h("th", { class: "num" }, c.replace("_", " "))))),
      h("tbody", null, rows.map((row) => h("tr", null, h("td", { class: "mono" }, row.key),
        h("td", { class: "num" }, tokens(row.sessions)), h("td", { class: "num" }, tokens(row.loops)),
        columns.map((c) => h("td", { class: "num" }, tokens(row.usage[c])))))))));
  }

  window.addEventListener("hashchange", route);
  route();
})();
