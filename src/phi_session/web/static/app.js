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
  const PAGE_SIZE = "50"; // sessions per list page
  const LOOP_PAGE = 200; // loops and events per request
  const MAX_INDENT = 10; // levels of the loop tree and the timeline that move right
  const FILTERS = [
    ["agent", "Agent", "agent id"],
    ["model", "Model", "provider/model"],
    ["since", "Active since", "7d, 24h, 2025-06-01"],
    ["until", "Active before", "RFC 3339 or date"],
  ];

  // -- DOM helpers: text only ---------------------------------------------------------

  // Bidirectional controls would show recorded text in another order than it is stored
  // (an agent "agent\u202e1-toor" read "agentroot-1"): shown as escapes, the set and the
  // form the CLI's (BIDI_CONTROLS in cli/render.py; a test holds the two the same).
  const BIDI_CONTROLS = /[\u202a-\u202e\u2066-\u2069]/g;

  function shown(value) {
    return String(value).replace(BIDI_CONTROLS, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
  }

  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, key === "title" ? shown(value) : String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, ...children) {
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.appendChild(child instanceof Node ? child : child instanceof Clipped ? clippedNode(child)
        : document.createTextNode(shown(child)));
    }
    return node;
  }

  // -- texts the server cut -----------------------------------------------------------
  // In a loop's, a loop list row's and an event's JSON the server cuts every text over
  // 64 KiB, keys too, and lists the cuts beside it ({path: a JSON pointer, key: whether
  // the key there is the text, bytes, field}: clip in web/pages.py). Each such text becomes
  // a Clipped where it was (a key, in clippedKeys): drawn as what came and a button that
  // fetches it whole from the field view. Read as text (toString, toJSON) it is what came,
  // its "… [clipped: N bytes]" marker included.
  class Clipped {
    constructor(text, bytes, url) {
      this.text = text;
      this.bytes = bytes;
      this.url = url;
    }

    toString() {
      return this.text;
    }

    toJSON() {
      return this.text;
    }
  }

  // An object's cut keys (a key stays a string): the object -> its key -> the Clipped.
  const clippedKeys = new WeakMap();

  function markClipped(tree, cuts, sessionId) {
    const own = (holder, key) => holder !== null && typeof holder === "object" && Object.prototype.hasOwnProperty.call(holder, key);
    for (const cut of cuts || []) {
      const steps = String(cut.path).split("/").slice(1).map((step) => step.replace(/~1/g, "/").replace(/~0/g, "~"));
      const last = steps.pop();
      let holder = tree;
      for (const step of steps) holder = own(holder, step) ? holder[step] : null;
      if (!own(holder, last)) continue;
      const url = "api/sessions/" + encodeURIComponent(sessionId) + "/field?" + cut.field;
      if (cut.key) {
        if (!clippedKeys.has(holder)) clippedKeys.set(holder, new Map());
        clippedKeys.get(holder).set(last, new Clipped(last, cut.bytes, url));
      } else if (typeof holder[last] === "string") {
        holder[last] = new Clipped(holder[last], cut.bytes, url);
      }
    }
    return tree;
  }

  // What came of a cut text, drawn by `draw` (as text by default), and a button that
  // draws it whole in its place; `head` is what shows until then.
  function clippedNode(clip, draw = (text) => text, head = draw(clip.text)) {
    const holder = h("span", { class: "clipped" });
    const button = h("button", { type: "button", class: "secondary show-all" }, "show all (" + tokens(clip.bytes) + " bytes)");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const whole = await api(clip.url);
        clear(holder);
        append(holder, draw(String(whole)));
      } catch (error) {
        button.disabled = false;
        append(holder, showError(error));
      }
    });
    return append(holder, head, " ", button);
  }

  // SVG elements, attributes only (no style attribute: the CSP forbids inline styles).
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    append(node, children);
    return node;
  }

  function duration(ms) {
    if (!isFinite(ms)) return "";
    if (ms < 1000) return Math.round(ms) + "ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + "s";
    const minutes = Math.floor(ms / 60000);
    return minutes < 60 ? minutes + "m" + String(Math.floor(ms / 1000) % 60).padStart(2, "0") + "s"
      : Math.floor(minutes / 60) + "h" + String(minutes % 60).padStart(2, "0") + "m";
  }

  // A cost from the API: unknown (null) is never shown as $0. Why, in the CLI's words: the
  // models without a price, and those whose calls reported only a total ("unsplit", also
  // listed in "unpriced": they have a price, but no rate applies to a bare total).
  function costText(cost) {
    if (!cost) return "";
    if (cost.usd === null || cost.usd === undefined) {
      const unsplit = cost.unsplit || [];
      const missing = (cost.unpriced || []).filter((name) => !unsplit.includes(name));
      return "cost unknown" + (missing.length ? " (no price for " + missing.join(", ") + ")" : "") +
        (unsplit.length ? " (tokens not split by kind for " + unsplit.join(", ") + ")" : "");
    }
    const usd = Number(cost.usd);
    // Three significant digits below $1, never exponent notation (toPrecision's below 1e-6).
    const digits = usd > 0 && usd < 1 ? Math.min(100, 2 - Math.floor(Math.log10(usd))) : 2;
    return "$" + usd.toFixed(digits) + (cost.unpriced && cost.unpriced.length ? " + unpriced" : "");
  }

  // Costs are extra: a viewer whose server has no cost API (or no prices) shows none.
  async function optional(path) {
    try {
      return await api(path);
    } catch (error) {
      return null;
    }
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

  // Indented JSON text; one holding a cut text (a value or a key) comes as a list of text
  // and, for each cut, its node (clippedNode), which shows it and then its whole as JSON
  // strings.
  function json(value) {
    const cuts = [];
    const mark = "clip-" + Math.random().toString(36).slice(2) + "-";
    const marked = (clip) => mark + (cuts.push(clip) - 1);
    const text = JSON.stringify(value, function (key, item) {
      if (this[key] instanceof Clipped) return marked(this[key]);
      const keys = clippedKeys.get(this[key]);
      if (keys === undefined) return item;
      return Object.fromEntries(Object.entries(item).map(([name, member]) =>
        [keys.has(name) ? marked(keys.get(name)) : name, member]));
    }, 2);
    if (!cuts.length) return text;
    return text.split(new RegExp('"' + mark + '(\\d+)"')).map((part, index) =>
      index % 2 ? clippedNode(cuts[Number(part)], (whole) => JSON.stringify(whole)) : part);
  }

  function addUsage(total, usage) {
    for (const key of ["input", "output", "reasoning", "cache_read", "cache_write", "total_tokens"]) {
      total[key] = (total[key] || 0) + Number((usage || {})[key] || 0);
    }
    return total;
  }

  // A call's total tokens (model.counted_total): its own, else (phi-core's Anthropic provider
  // sets none, counting the cache apart) its input, cache and output tokens.
  function countedTotal(usage) {
    const u = usage || {};
    return Number(u.total_tokens || 0) ||
      Number(u.input || 0) + Number(u.output || 0) + Number(u.cache_read || 0) + Number(u.cache_write || 0);
  }

  function usageText(usage) {
    const u = usage || {};
    const parts = [tokens(countedTotal(u)) + " tokens", "in " + tokens(u.input), "out " + tokens(u.output)];
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
      : parts[0] === "session" && parts[1] !== undefined ? "session" : parts[0] === "stats" ? "stats"
        : parts[0] === "search" ? "search" : parts[0] === "diff" ? "diff" : "list";
    for (const link of document.querySelectorAll("[data-nav]")) {
      link.classList.toggle("active", link.dataset.nav === (view === "stats" || view === "diff" ? view : "list"));
    }
    const page = h("div", { class: "view view-" + view });
    try {
      if (badHash) throw badHash;
      if (view === "session") await sessionView(page, parts[1], params);
      else if (view === "stats") await statsView(page, params);
      else if (view === "search") await searchView(page, params);
      else if (view === "diff") await diffView(page, params);
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
      field("limit", "Page size", PAGE_SIZE, { class: "narrow", inputmode: "numeric" }),
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
    if (!query.has("limit")) query.set("limit", PAGE_SIZE);
    let result;
    try {
      result = await api("api/session-page?" + query);
    } catch (error) {
      append(page, showError(error));
      return;
    }
    const rows = result.sessions;
    const paging = [];
    if (params.has("after")) {
      const first = new URLSearchParams(params);
      first.delete("after");
      paging.push(h("a", { href: "#/" + (first.toString() ? "?" + first : ""), id: "first-page" }, "first page"));
    }
    if (result.next) {
      const next = new URLSearchParams(params);
      next.set("after", result.next);
      paging.push(h("a", { href: "#/?" + next, id: "next-page" }, "next page →"));
    }
    append(page, h("p", { class: "muted" }, h("span", { id: "session-count" }, plural(rows.length, "session")),
      params.has("after") ? " on this page" : "", paging.length ? " · " : "",
      paging.map((link, index) => [index ? " · " : "", link])));
    if (!rows.length) return;
    const costs = new Map();
    const table = h(
      "table",
      { class: "data", id: "sessions" },
      h("thead", null, h("tr", null, ["Session", "First prompt", "Agent", "Last active"].map((t) => h("th", null, t)),
        h("th", { class: "num" }, "Duration"), h("th", null, "Loops"),
        h("th", { class: "num" }, "Turns"), h("th", { class: "num" }, "Tokens"), h("th", { class: "num" }, "Cost"),
        h("th", null, "Model"), h("th", null, "Parent"))),
      h("tbody", null, rows.map((row) => {
        const cost = h("td", { class: "num cost" }, "");
        costs.set(row.session_id, cost);
        return h("tr", null,
          h("td", { class: "id", title: row.session_id }, h("a", { href: sessionHref(row.session_id), class: "mono session-link" }, row.session_id)),
          h("td", { class: "prompt clip", title: row.first_prompt || "" }, row.first_prompt || ""),
          h("td", { class: "mono clip", title: row.agent_id }, row.agent_id),
          h("td", { class: "nowrap", title: row.last_active_at }, secondsTime(row.last_active_at)),
          h("td", { class: "num nowrap" }, duration(Date.parse(row.last_active_at) - Date.parse(row.created_at))),
          h("td", null, statusChips(row.loops_by_status), row.rejected ? h("span", { class: "chip rejected" }, "rejected") : null),
          h("td", { class: "num" }, tokens(row.turn_count)),
          h("td", { class: "num" }, tokens(row.total_tokens)),
          cost,
          h("td", null, (row.models || []).join(", ")),
          h("td", { class: "clip" }, row.parent_session_id
            ? h("a", { href: sessionHref(row.parent_session_id), class: "mono", title: row.parent_session_id },
              row.parent_session_id) : ""));
      })),
    );
    append(page, h("div", { class: "table-wrap" }, table));
    fillCosts(costs);
  }

  // Costs come from each session's overview (priced from its outline), a few at a time, after
  // the table shows; the first prompts are in the rows.
  async function fillCosts(cells) {
    const queue = [...cells.entries()];
    const worker = async () => {
      while (queue.length) {
        const [id, cell] = queue.shift();
        try {
          cell.textContent = shown(costText((await api("api/sessions/" + encodeURIComponent(id) + "/overview")).cost));
        } catch (error) {
          cell.textContent = "";
        }
      }
    };
    await Promise.all([worker(), worker(), worker()]);
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

  function sessionHeader(session, summary, prompt, eventCount, costCell) {
    const spawn = session.parent_spawn_ref;
    const parent = spawn
      ? h("span", { id: "parent-link" }, "spawned by ",
        h("a", { href: sessionHref(spawn.parent_session_id, spawn.parent_loop_id), class: "mono" }, spawn.parent_session_id),
        " via tool ", h("code", null, spawn.tool_name), " (call ", h("code", null, spawn.tool_call_id), ")")
      : h("span", { class: "muted" }, "none (not a sub-agent session)");
    const rows = [
      ["Agent", h("span", { class: "mono" }, session.agent_id)],
      ["First prompt", prompt || h("span", { class: "muted" }, "none")],
      ["Formation", formationText(session.formation)],
      ["Scope", session.scope],
      ["Created", shortTime(session.created_at)],
      ["Last active", shortTime(session.last_active_at) + " (" + duration(Date.parse(session.last_active_at) - Date.parse(session.created_at)) + " after creation)"],
      ["Parent", parent],
      ["Rejected", session.rejected ? h("span", { class: "chip rejected" }, "rejected by before_task") : "no"],
      ["Loops", [statusChips(summary.loops_by_status), " ", plural(summary.turn_count, "turn"), " · ", plural(eventCount, "stored event")]],
      ["Usage", usageText(summary.usage)],
    ];
    rows.push(["Cost", costCell]);
    return h("div", { class: "panel" }, h("dl", { class: "kv" }, rows.map(([key, value]) => [h("dt", null, key), h("dd", null, value)])));
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
          const image = (data) => {
            const node = h("img", { class: "block image", alt: "image (" + block.mimeType + ")" });
            node.src = "data:" + block.mimeType + ";base64," + String(data).replace(/[^A-Za-z0-9+/=]/g, "");
            return node;
          };
          // Cut, its data would draw a broken image: it is fetched whole to be shown.
          return block.data instanceof Clipped
            ? h("div", { class: "block" }, clippedNode(block.data, image, "[image " + block.mimeType + "]"))
            : image(block.data);
        }
        return h("div", { class: "block muted" }, "[image " + block.mimeType + "]");
      }
      default:
        return h("pre", { class: "block" }, json(block));
    }
  }

  // The role of an LLM message, null for an extension message. phi-core reads a message
  // as an LLM message when it can (spec 3.5), else as an extension (role, kind, data):
  // stored, an LLM message always has its content, an extension never has any, and an
  // extension may take any role, "user" and "assistant" too.
  function llmRole(message) {
    const role = String(message.role);
    return Object.prototype.hasOwnProperty.call(ROLE_CLASSES, role) && message.content !== undefined ? role : null;
  }

  function messageView(message) {
    const role = String(message.role);
    const known = llmRole(message) !== null;
    const isError = known && role === "toolResult" && message.isError;
    const head = h("div", { class: "msg-head" }, h("span", { class: "role" }, role));
    const box = h("div", { class: "msg " + (known ? ROLE_CLASSES[role] : "msg-extension") + (isError ? " is-error" : "") }, head);
    if (!known) {
      append(head, h("span", null, String(message.kind)));
      append(box, h("pre", null, json(message.data)));
      return box;
    }
    if (role === "assistant") {
      append(head, h("span", null, message.provider + "/" + message.model), h("span", null, "stop: " + message.stopReason),
        h("span", null, tokens(countedTotal(message.usage)) + " tokens"));
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
    return (turn.input_messages || []).filter((message) => !(llmRole(message) === "toolResult" && shown.has(message.toolCallId)));
  }

  // usage: the turn's as it shows (LoopRecord.turn_usage, the loop's turn_usages).
  function turnView(turn, previous, index, usage) {
    return h("div", { class: "turn", "data-turn-index": index },
      h("div", { class: "turn-head" },
        h("strong", null, "Turn " + turn.turn_id.turnIndex),
        h("span", null, "triggered by " + turn.triggered_by),
        h("span", null, seconds(turn.started_at, turn.ended_at)),
        h("span", null, usageText(usage || turn.usage))),
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

  // The conversation as the user saw it: user and assistant text, tool calls folded with their results.
  // A loop that never ended (aborted, or still running) has no messages yet: its turns hold them.
  function chatView(loop) {
    const messages = (loop.messages || []).length ? loop.messages : (loop.turns || []).flatMap((turn) =>
      [...(turn.input_messages || []), turn.output_message, ...(turn.tool_results || [])].filter(Boolean));
    const results = new Map();
    for (const message of messages) {
      if (llmRole(message) === "toolResult") results.set(message.toolCallId, message);
    }
    const bubbles = [];
    for (const message of messages) {
      const role = llmRole(message); // extension messages are the app's, not the conversation's
      if (role === "user") {
        bubbles.push(h("div", { class: "bubble bubble-user" }, (message.content || []).map(contentBlock)));
      } else if (role === "assistant") {
        const parts = (message.content || []).map((block) => {
          if (block && block.type === "toolCall") {
            const result = results.get(block.id);
            return h("details", { class: "chat-tool" },
              h("summary", null, "🔧 " + block.name + (result ? (result.isError ? " (error)" : "") : " (no result)")),
              h("pre", null, json(block.arguments)),
              result ? h("div", { class: "chat-result" }, (result.content || []).map(contentBlock)) : null);
          }
          return contentBlock(block);
        });
        bubbles.push(h("div", { class: "bubble bubble-assistant" }, parts,
          message.errorMessage ? h("div", { class: "chip error" }, message.errorMessage) : null));
      }
    }
    return h("div", { class: "chat" }, bubbles.length ? bubbles : h("p", { class: "muted" }, "No messages."));
  }

  function loopBody(loop, row, sessionId) {
    const group = loop.parallel_group;
    const facts = [
      ["Started", shortTime(loop.started_at)],
      ["Ended", loop.ended_at ? shortTime(loop.ended_at) + " (" + seconds(loop.started_at, loop.ended_at) + ")" : "not ended"],
      ["Config", configText(loop.config)],
      ["Usage", usageText(row.billed_usage)],
      ["Events", h("a", { href: "#", class: "loop-events", onclick: (event) => {
        event.preventDefault();
        document.dispatchEvent(new CustomEvent("phi-show-events", { detail: row.index }));
      } }, plural(row.event_count, "stored event"))],
    ];
    if (Number(row.unfinished_usage.total_tokens) || Number(row.unfinished_usage.input) || Number(row.unfinished_usage.output)) {
      facts.push(["Unfinished turn", h("span", { class: "chip error" }, "cut off: " + usageText(row.unfinished_usage) + " (counted in the usage)")]);
    }
    if (loop.parent_loop_id) {
      facts.push(["Continues", h("span", { class: "mono" }, loop.parent_loop_id + (row.parent_in_session ? "" : " (not in this session)"))]);
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
    // A rerun or a branch (a replay, a fork) is compared with the loop it continues.
    const kind = kindText(loop.continuation_kind).split(":")[0];
    const compare = h("div", { class: "toolbar compare-links" },
      (kind === "Branch" || kind === "Rerun") && row.parent_in_session
        ? h("a", { href: diffHref(sessionId, loop.parent_loop_id, sessionId, loop.loop_id), class: "compare-parent" }, "compare with parent")
        : null,
      h("button", { type: "button", class: "secondary pick-compare", onclick: () => pickForCompare(sessionId, loop.loop_id) }, "Compare…"));
    return h("div", null,
      h("dl", { class: "kv" }, facts.map(([key, value]) => [h("dt", null, key), h("dd", null, value)])),
      links.length ? h("div", { class: "links" }, links) : null, compare);
  }

  // A loop's summary line and facts show at once; its turns load when it is first opened.
  function loopView(row, sessionId) {
    const loop = row.loop;
    const group = loop.parallel_group;
    const summary = h("summary", null,
      h("span", { class: "muted" }, "#" + (row.index + 1)),
      h("span", { class: "chip " + statusClass(loop.status) }, loop.status),
      h("span", { class: "chip kind" }, kindText(loop.continuation_kind)),
      h("span", { class: "loop-id" }, loop.loop_id),
      group ? h("span", { class: "chip " + (group.is_selected ? "winner" : "loser") },
        group.is_selected ? "★ parallel winner" : "parallel, not selected") : null,
      loop.child_loop_refs && loop.child_loop_refs.length ? h("span", { class: "chip kind" }, plural(loop.child_loop_refs.length, "sub-agent")) : null,
      h("span", { class: "loop-stats" },
        [loop.config ? loop.config.provider + "/" + loop.config.model : null, plural(row.turn_count, "turn"),
          plural(row.tool_calls, "tool call"), tokens(row.billed_usage.total_tokens) + " tokens"].filter(Boolean).join(" · ")));
    const turnsHolder = h("div", { class: "loop-turns" }, h("p", { class: "muted" }, "Loading turns…"));
    const body = h("div", { class: "loop-body" }, loopBody(loop, row, sessionId), turnsHolder);
    const details = h("details", { class: "loop " + statusClass(loop.status) }, summary, body);
    details.dataset.loopId = loop.loop_id;
    details.dataset.loopIndex = row.index;
    let loaded = null;
    details.load = () => {
      if (!loaded) loaded = loadTurns(sessionId, row, turnsHolder);
      return loaded;
    };
    details.addEventListener("toggle", () => { if (details.open) details.load(); });
    return h("div", { class: "loop-node" }, details, h("div", { class: "children" }));
  }

  async function loadTurns(sessionId, row, holder) {
    let loop;
    try {
      loop = await api("api/sessions/" + encodeURIComponent(sessionId) + "/loops/" + row.index);
      markClipped(loop, loop.clipped, sessionId);
      // The server reads the session as stored now: saved anew since this list was read,
      // its loop at this index may be another one, whose turns must not show under this header
      // (compared as text: an id over 64 KiB comes cut, a Clipped).
      if (String(loop.loop_id) !== String(row.loop.loop_id)) {
        throw new Error("loop #" + (row.index + 1) + " is now " + loop.loop_id + ", no longer the loop listed here: the session was saved anew; reload the page");
      }
    } catch (error) {
      clear(holder);
      append(holder, showError(error));
      return;
    }
    const turns = loop.turns || [];
    const structured = h("div", { class: "structured" },
      turns.map((turn, index) => turnView(turn, turns[index - 1], index, (loop.turn_usages || [])[index])),
      turns.length ? null : h("p", { class: "muted" }, "No completed turns."));
    const chat = chatView(loop);
    chat.hidden = true;
    const pick = (showChat) => () => {
      chat.hidden = !showChat;
      structured.hidden = showChat;
      structuredButton.classList.toggle("active", !showChat);
      chatButton.classList.toggle("active", showChat);
    };
    const structuredButton = h("button", { type: "button", class: "secondary active view-structured", onclick: pick(false) }, "Structured");
    const chatButton = h("button", { type: "button", class: "secondary view-chat", onclick: pick(true) }, "Chat");
    clear(holder);
    append(holder, h("div", { class: "toolbar view-switch" }, structuredButton, chatButton), structured, chat);
  }

  // Appends a page of loops (tree order, with depth) under their parents' .children.
  function addLoops(tree, stack, rows, sessionId, elements) {
    for (const row of rows) {
      markClipped(row.loop, row.clipped, sessionId);
      const node = loopView(row, sessionId);
      stack.length = Math.min(stack.length, row.depth);
      // As on the timeline: past MAX_INDENT levels a chain stops nesting. Its loops follow
      // one another under their ancestor at that depth (a chat's loops each continue the
      // one before: nested, 300 of them squeezed the deepest to a few pixels, and 2,000
      // made a DOM too deep for the browser's tab, which crashed).
      const parent = stack[Math.min(stack.length, MAX_INDENT + 1) - 1];
      const holder = parent ? parent.querySelector(":scope > .children") : tree;
      if (row.depth > MAX_INDENT) holder.classList.add("flat");
      holder.appendChild(node);
      stack.push(node);
      const details = node.querySelector("details.loop");
      if (!elements.has(row.loop.loop_id)) elements.set(row.loop.loop_id, details);
    }
  }

  // The event's own fields on one line, cut short: the full JSON opens below it.
  function eventPreview(event) {
    const rest = Object.assign({}, event);
    for (const key of ["type", "loop_id", "timestamp"]) delete rest[key];
    const text = JSON.stringify(rest);
    return text.length > 140 ? text.slice(0, 139) + "…" : text;
  }

  function eventRows(rows, sessionId) {
    for (const row of rows) markClipped(row.event, row.clipped, sessionId);
    return rows.map((row) => h("tr", null,
      h("td", null, row.loop_index === null ? "session" : "#" + (row.loop_index + 1)),
      h("td", { class: "num" }, row.sequence === null ? "" : row.sequence),
      h("td", null, String(row.event.type)),
      h("td", { class: "nowrap" }, shortTime(row.event.timestamp)),
      h("td", { class: "event-cell" }, h("details", null, h("summary", { class: "muted" }, eventPreview(row.event)),
        h("pre", null, json(row.event))))));
  }

  // The event log, a page at a time, filtered by type and loop.
  async function eventLog(holder, sessionId, filter) {
    const base = "api/sessions/" + encodeURIComponent(sessionId) + "/event-log?limit=" + LOOP_PAGE;
    const suffix = (filter.type ? "&type=" + encodeURIComponent(filter.type) : "") +
      (filter.loop !== undefined && filter.loop !== null ? "&loop=" + filter.loop : "");
    const first = await api(base + suffix);
    const typeSelect = h("select", { id: "event-type" }, h("option", { value: "" }, "all types"),
      Object.entries(first.types).map(([name, n]) => h("option", { value: name }, name + " (" + tokens(n) + ")")));
    typeSelect.value = filter.type || "";
    typeSelect.addEventListener("change", () => {
      clear(holder);
      eventLog(holder, sessionId, { type: typeSelect.value, loop: filter.loop }).catch((error) => append(holder, showError(error)));
    });
    const body = h("tbody", null, eventRows(first.events, sessionId));
    // A page may end before its limit, once it holds its bytes: the next starts at its "next".
    let loaded = first.events.length;
    let next = first.next;
    const count = h("span", { id: "event-count" });
    const more = h("button", { type: "button", class: "secondary", id: "more-events" }, "Load more events");
    const update = () => {
      count.textContent = tokens(loaded) + " of " + plural(first.total, "event") +
        (filter.loop !== undefined && filter.loop !== null ? " of loop #" + (filter.loop + 1) : "");
      more.hidden = next === null;
    };
    more.addEventListener("click", async () => {
      more.disabled = true;
      try {
        const page = await api(base + suffix + "&offset=" + next);
        append(body, eventRows(page.events, sessionId));
        loaded += page.events.length;
        next = page.next;
        update();
      } catch (error) {
        append(holder, showError(error));
      } finally {
        more.disabled = false;
      }
    });
    update();
    append(holder, h("div", { class: "toolbar" }, h("label", null, "Type ", typeSelect), count),
      h("div", { class: "table-wrap" }, h("table", { class: "data event-log", id: "event-log" },
        h("thead", null, h("tr", null, h("th", null, "Loop"), h("th", { class: "num" }, "Seq"), h("th", null, "Type"),
          h("th", null, "Time"), h("th", null, "Event"))), body)),
      more);
  }

  // -- timeline -----------------------------------------------------------------------------

  const ROW = 20, LABEL = 330, AXIS = 760;

  const TIMELINE_LOOPS = 20; // loops per timeline page (each loop's bars: its turns, model and tool calls)

  function barTitle(bar) {
    const lines = [bar.label + (bar.detail ? " · " + bar.detail : ""), duration(bar.duration_ms) + (bar.end ? "" : " (not ended)") +
      " from " + shortTime(bar.start)];
    if (bar.usage) lines.push(usageText(bar.usage));
    if (bar.cost) lines.push(costText(bar.cost));
    if (bar.status) lines.push("status " + bar.status);
    return lines.join("\n");
  }

  // The waterfall, a page of loops at a time: the next page loads when the end of the
  // scrolled box comes into view (or on "Show more"), so a huge session never loads whole.
  async function timelineView(holder, sessionId, openTurn) {
    const base = "api/sessions/" + encodeURIComponent(sessionId) + "/timeline?limit=" + TIMELINE_LOOPS;
    const first = await api(base);
    const span = Math.max(first.span_ms, 1e-6);
    const chart = svg("svg", { class: "timeline", id: "timeline", width: LABEL + AXIS + 70, role: "img",
      "aria-label": "timeline of loops, turns, model and tool calls" });
    const ticks = svg("g", { class: "ticks" });
    for (let i = 0; i <= 4; i++) {
      const x = LABEL + (AXIS * i) / 4;
      append(ticks, svg("line", { x1: x, x2: x, y1: 14, y2: "100%", class: "tick" }),
        svg("text", { x: x, y: 11, class: "tick-label", "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" },
          duration((span * i) / 4)));
    }
    chart.appendChild(ticks);
    let rows = 0;
    let next = first.next;
    const add = (bars) => {
      for (const bar of bars) {
        const y = 18 + rows * ROW;
        // A sub-agent session drawn inline may reach beyond the session's axis: clamp it.
        const start = Math.min(Math.max(bar.offset_ms, 0), span);
        const x = LABEL + (start / span) * AXIS;
        const width = Math.max(2, (Math.min(bar.duration_ms, span - start) / span) * AXIS);
        // A long chain of continuations nests deep: past MAX_INDENT levels the labels stop moving right.
        const indent = Math.min(bar.depth, MAX_INDENT);
        const label = bar.label.length > 44 - indent * 2 ? bar.label.slice(0, 43 - indent * 2) + "…" : bar.label;
        // A sub-agent's session bar opens that session (a page draws only its first loops).
        const clickable = bar.loop_id !== null || bar.session_id !== sessionId;
        const group = svg("g", { class: "bar bar-" + bar.kind + (bar.status ? " " + statusClass(bar.status) : "") +
          (clickable ? " clickable" : ""), "data-kind": bar.kind, "data-loop-index": bar.loop_index, tabindex: clickable ? 0 : null,
        onclick: clickable ? () => openTurn(bar) : null,
        onkeydown: clickable ? (event) => { if (event.key === "Enter") openTurn(bar); } : null },
        svg("title", null, barTitle(bar)),
        svg("rect", { x: 0, y: y - 1, width: LABEL + AXIS, height: ROW, class: "row-hit" }),
        svg("text", { x: 4 + indent * 12, y: y + 13, class: "bar-label" }, label),
        svg("rect", { x: x, y: y + 3, width: width, height: ROW - 6, rx: 2, class: "bar-rect" }),
        svg("text", { x: Math.min(x + width + 4, LABEL + AXIS + 4), y: y + 13, class: "bar-note" },
          duration(bar.duration_ms) + (bar.usage ? " · " + tokens(bar.usage.total_tokens) : "")));
        chart.appendChild(group);
        rows += 1;
      }
      chart.setAttribute("height", 22 + rows * ROW);
    };
    add(first.bars);
    const more = h("button", { type: "button", class: "secondary", id: "more-bars" }, "Show more of the timeline");
    const count = h("span", { class: "muted", id: "timeline-count" });
    const update = () => {
      const shown = next === null ? first.loops : next;
      count.textContent = plural(rows, "bar") + " for " + tokens(shown) + " of " + plural(first.loops, "loop") + " · " +
        duration(first.span_ms) + " from " + shortTime(first.start);
      more.hidden = next === null;
    };
    let loading = null;
    let observer = null;
    const loadMore = () => {
      if (next === null || loading) return loading;
      more.disabled = true;
      loading = api(base + "&offset=" + next).then((result) => {
        add(result.bars);
        next = result.next;
        update();
      }).finally(() => {
        more.disabled = false;
        loading = null;
        if (observer && next !== null) { // observed anew: it reports whether the end is still in view
          observer.unobserve(more);
          observer.observe(more);
        }
      });
      return loading;
    };
    more.addEventListener("click", () => { loadMore().catch((error) => append(holder, showError(error))); });
    update();
    const wrap = h("div", { class: "timeline-wrap", id: "timeline-wrap" }, chart, more);
    append(holder, h("div", { class: "toolbar" }, count,
      h("span", { class: "legend" }, ["loop", "turn", "model", "tool"].map((kind) =>
        h("span", { class: "legend-" + kind }, kind === "model" ? "model call" : kind === "tool" ? "tool call" : kind)))),
    wrap);
    if ("IntersectionObserver" in window) {
      // Scrolling near the end of the box loads the next page of loops.
      observer = new IntersectionObserver((entries) => {
        if (wrap.isConnected && next !== null && entries.some((entry) => entry.isIntersecting)) {
          loadMore().catch((error) => { observer.disconnect(); append(holder, showError(error)); });
        }
      }, { root: wrap, rootMargin: "0px 0px 200px 0px" });
      observer.observe(more);
    }
  }

  async function sessionView(page, id, params) {
    const base = "api/sessions/" + encodeURIComponent(id);
    // The overview comes from the session's outline (fast on a huge session); its cost (every
    // loop priced) and the timeline (a page of loops at a time) fill in after the page shows.
    const overview = await api(base + "/overview?cost=0");
    const costCell = h("span", { id: "session-cost", class: "muted" }, "…");
    const session = overview.session;
    const focus = params.get("loop");
    const focusTurn = params.get("turn");
    append(page,
      h("p", null, h("a", { href: "#/" }, "← all sessions")),
      h("h1", null, "Session ", h("span", { class: "mono" }, session.session_id)),
      sessionHeader(session, overview.summary, overview.first_prompt, overview.event_count, costCell));

    // Loops: pages in tree order; more pages while the focused loop is not yet there.
    const elements = new Map();
    const stack = [];
    const tree = h("div", { class: "loop-tree", id: "loop-tree" });
    let loaded = 0, total = 0;
    const moreLoops = h("button", { type: "button", class: "secondary", id: "more-loops" }, "Load more loops");
    const loopCount = h("span", { class: "muted", id: "loop-count" });
    const loadLoops = async () => {
      const result = await api(base + "/loops?limit=" + LOOP_PAGE + "&offset=" + loaded);
      total = result.total;
      addLoops(tree, stack, result.loops, id, elements);
      loaded += result.loops.length;
      loopCount.textContent = tokens(loaded) + " of " + plural(total, "loop") + " shown";
      moreLoops.hidden = loaded >= total;
    };
    await loadLoops();
    // A link to a late loop (a search hit, ?loop=) loads the pages up to it, as openTurn does.
    while (focus && !elements.has(focus) && loaded < total) await loadLoops();
    moreLoops.addEventListener("click", async () => {
      moreLoops.disabled = true;
      try { await loadLoops(); } catch (error) { append(tree, showError(error)); } finally { moreLoops.disabled = false; }
    });

    const openTurn = async (bar) => {
      if (bar.session_id !== id) {
        location.hash = sessionHref(bar.session_id, bar.loop_id);
        return;
      }
      let target = elements.get(bar.loop_id);
      while (!target && loaded < total) {
        await loadLoops();
        target = elements.get(bar.loop_id);
      }
      if (!target) return;
      for (const old of tree.querySelectorAll(".highlight")) old.classList.remove("highlight");
      target.open = true;
      await target.load();
      const turn = bar.turn_index === null ? null : target.querySelector('.turn[data-turn-index="' + bar.turn_index + '"]');
      (turn || target).classList.add("highlight");
      (turn || target).scrollIntoView({ block: "start" });
    };

    const target = focus && elements.get(focus);
    if (target) {
      target.classList.add("highlight");
      target.open = true;
      if (focusTurn !== null) target.load().then(() => openTurn({ session_id: id, loop_id: focus, turn_index: Number(focusTurn) }));
    } else if (focus) {
      append(page, showError(new Error("no loop " + focus + " in this session: showing the session from its start")));
    }

    const logHolder = h("div", { id: "event-log-holder" });
    const toggle = h("button", { type: "button", class: "secondary", id: "show-events" }, "Show raw event log");
    const showEvents = async (filter) => {
      clear(logHolder);
      toggle.disabled = true;
      try {
        await eventLog(logHolder, id, filter);
        toggle.textContent = "Hide raw event log";
      } catch (error) {
        append(logHolder, showError(error));
      } finally {
        toggle.disabled = false;
      }
    };
    toggle.addEventListener("click", async () => {
      if (logHolder.firstChild) {
        clear(logHolder);
        toggle.textContent = "Show raw event log";
        return;
      }
      await showEvents({});
    });
    const onLoopEvents = (event) => {
      if (!document.body.contains(page)) {
        document.removeEventListener("phi-show-events", onLoopEvents);
        return;
      }
      showEvents({ loop: event.detail }).then(() => logHolder.scrollIntoView({ block: "start" }));
    };
    document.addEventListener("phi-show-events", onLoopEvents);
    const expandAll = h("button", { type: "button", class: "secondary", onclick: () => {
      for (const details of tree.querySelectorAll("details.loop")) details.open = true;
    } }, "Expand loaded loops");
    const timelineHolder = h("div", { id: "timeline-holder" }, h("p", { class: "muted" }, "Loading the timeline…"));
    append(page,
      h("h2", null, "Timeline"),
      timelineHolder,
      h("h2", null, "Loops"),
      h("div", { class: "toolbar" }, expandAll, loopCount,
        h("a", { href: base, target: "_blank", rel: "noopener" }, "phi-core JSON")),
      tree, moreLoops,
      h("h2", null, "Event log"),
      h("div", { class: "toolbar" }, toggle),
      logHolder);
    // The waterfall and the cost fill in after the page shows.
    optional(base + "/overview").then((priced) => {
      const cost = priced && priced.cost;
      costCell.textContent = shown(cost ? costText(cost) + (cost.sources && cost.sources.length ? " · prices: " + cost.sources.join(", ") : "") : "cost unavailable");
      costCell.classList.remove("muted");
    });
    const timelineBox = h("div");
    timelineView(timelineBox, id, openTurn).then(() => {
      clear(timelineHolder);
      append(timelineHolder, timelineBox);
    }, (error) => {
      clear(timelineHolder);
      append(timelineHolder, showError(error));
    });
  }

  // -- diff: two runs compared (api/diff) ------------------------------------------------

  // A loop picked with "Compare…", waiting for the second one (it survives navigation).
  let picked = null;

  function refParams(query, side, sessionId, loopId) {
    // The API splits SESSION:LOOP at the first colon: a session id holding one names its loop apart.
    if (String(sessionId).includes(":")) {
      query.set(side, sessionId);
      query.set("loop_" + side, loopId);
    } else {
      query.set(side, sessionId + ":" + loopId);
    }
  }

  function diffHref(sessionA, loopA, sessionB, loopB) {
    const query = new URLSearchParams();
    refParams(query, "a", sessionA, loopA);
    refParams(query, "b", sessionB, loopB);
    return "#/diff?" + query;
  }

  function pickForCompare(sessionId, loopId) {
    if (picked && !(picked.session === sessionId && picked.loop === loopId)) {
      const first = picked;
      picked = null;
      compareBar();
      location.hash = diffHref(first.session, first.loop, sessionId, loopId);
      return;
    }
    picked = { session: sessionId, loop: loopId };
    compareBar();
  }

  function compareBar() {
    let bar = document.getElementById("compare-bar");
    if (!picked) {
      if (bar) bar.remove();
      return;
    }
    if (!bar) {
      bar = h("div", { id: "compare-bar", class: "compare-bar", role: "status" });
      app.parentNode.insertBefore(bar, app);
    }
    clear(bar);
    append(bar, "Comparing loop ", h("code", null, picked.loop), " of session ", h("code", null, picked.session),
      ": press Compare… on another loop, in any session. ",
      h("button", { type: "button", class: "secondary", id: "cancel-compare", onclick: () => { picked = null; compareBar(); } }, "Cancel"));
  }

  function signed(n, text) {
    return (n > 0 ? "+" : n < 0 ? "−" : "±") + text;
  }

  function secondsPair(a, b, delta) {
    const one = (value) => value === null || value === undefined ? "–" : duration(value * 1000);
    return one(a) + " → " + one(b) + (delta === null || delta === undefined ? "" : " (" + signed(delta, duration(Math.abs(delta) * 1000)) + ")");
  }

  function tokensPair(a, b, delta) {
    const one = (usage) => usage ? tokens(usage.total_tokens) : "–";
    return "tokens " + one(a) + " → " + one(b) + " (" + signed(delta.total_tokens, tokens(Math.abs(delta.total_tokens))) + ")";
  }

  // One change: its path, A's value, B's value; a changed text adds its line diff below.
  function changeRows(change, incidental) {
    const value = (side) => {
      const v = change[side];
      if (v === undefined) return h("span", { class: "muted" }, "—");
      return h("pre", { class: "diff-value " + (side === "a" ? "del" : "add") }, typeof v === "string" ? v : json(v));
    };
    const row = h("tr", { class: incidental ? "incidental" : null, "data-field": change.field },
      h("td", { class: "mono diff-path" }, change.path, change.kind !== "changed" ? h("span", { class: "muted" }, " (" + change.kind + ")") : null),
      h("td", null, value("a")), h("td", null, value("b")));
    // A line diff adds to the two sides only when a text has several lines.
    const lines = change.text_diff || [];
    const multiline = [change.a, change.b].some((v) => typeof v === "string" && v.includes("\n"));
    if (!lines.length || !multiline) return [row];
    const kind = (line) => line.startsWith("@@") ? "hunk" : line[0] === "-" ? "del" : line[0] === "+" ? "add" : "ctx";
    return [row, h("tr", { class: "diff-lines" }, h("td", null),
      h("td", { colspan: 2 }, h("pre", { class: "unified" }, lines.map((line) => h("span", { class: kind(line) }, line + "\n")))))];
  }

  function turnDiffView(turn, diff) {
    const link = (side, label) => h("a", { href: sessionHref(side.session_id, side.loop_id) + "&turn=" + turn.index, class: "turn-link" }, label);
    const head = h("div", { class: "turn-head" },
      h("strong", null, "Turn " + turn.index),
      h("span", { class: "chip diff-status diff-" + turn.status }, turn.status),
      h("span", null, secondsPair(turn.seconds_a, turn.seconds_b, turn.seconds_delta)),
      h("span", null, tokensPair(turn.usage_a, turn.usage_b, turn.usage_delta)),
      turn.status !== "added" ? link(diff.a, "open A") : null,
      turn.status !== "removed" ? link(diff.b, "open B") : null);
    return h("div", { class: "diff-turn diff-" + turn.status, "data-turn-index": turn.index }, head, changesTable(turn.changes, turn.incidental));
  }

  // The changes, then the incidental ones; none: no table.
  function changesTable(changes, incidental) {
    const rows = [...changes.map((change) => changeRows(change, false)), ...incidental.map((change) => changeRows(change, true))];
    return rows.length ? h("table", { class: "data diff-changes" },
      h("thead", null, h("tr", null, h("th", null, "What"), h("th", null, "A"), h("th", null, "B"))), h("tbody", null, rows)) : null;
  }

  function divergenceView(first, className) {
    return h("p", { class: className + " divergence " + (first ? "diverged" : "same") },
      first ? "First divergence: " + first.summary : "No divergence: the runs match in content (timing, tokens, model and ids aside).");
  }

  function loopDiffView(diff) {
    const { a, b } = diff;
    const loopLink = (side) => h("a", { href: sessionHref(side.session_id, side.loop_id), class: "mono" }, "#" + (side.position + 1) + " " + side.loop_id);
    const sessionLink = (side) => h("a", { href: sessionHref(side.session_id), class: "mono" }, side.session_id);
    const seconds = (side) => side.seconds === null ? "not ended" : duration(side.seconds * 1000);
    const rows = [
      ["Session", sessionLink(a), sessionLink(b)],
      ["Loop", loopLink(a), loopLink(b)],
      ["Kind", a.continuation, b.continuation],
      ["Status", h("span", { class: "chip " + statusClass(a.status) }, a.status), h("span", { class: "chip " + statusClass(b.status) }, b.status)],
      ["Model", a.model || "no config", b.model || "no config"],
      ["Turns", tokens(a.turn_count), tokens(b.turn_count)],
      ["Tokens", tokens(a.usage.total_tokens), tokens(b.usage.total_tokens) + " (" + signed(diff.usage_delta.total_tokens, tokens(Math.abs(diff.usage_delta.total_tokens))) + ")"],
      ["Duration", seconds(a), seconds(b) + (diff.seconds_delta === null ? "" : " (" + signed(diff.seconds_delta, duration(Math.abs(diff.seconds_delta) * 1000)) + ")")],
    ];
    const sides = h("table", { class: "data diff-sides" },
      h("thead", null, h("tr", null, h("th", null, ""), h("th", null, "A"), h("th", null, "B"))),
      h("tbody", null, rows.map(([label, left, right]) => h("tr", null, h("th", null, label), h("td", null, left), h("td", null, right)))));
    // How the loops differ in themselves (how they ended; without turns, their messages).
    const loopChanges = diff.changes.length ? h("div", { class: "diff-loop-changes" }, changesTable(diff.changes, [])) : null;
    return h("div", { class: "loop-diff" }, h("div", { class: "table-wrap" }, sides), divergenceView(diff.first_divergence, "first-divergence"), loopChanges,
      h("div", { class: "diff-turns" }, diff.turns.length ? diff.turns.map((turn) => turnDiffView(turn, diff)) : h("p", { class: "muted" }, "No turns on either side.")));
  }

  function sessionDiffView(diff) {
    const only = [["A", diff.only_in_a], ["B", diff.only_in_b]].flatMap(([label, sides]) => sides.map((side) =>
      h("li", { class: "only-in-" + label.toLowerCase() }, "only in " + label + ": ",
        h("a", { href: sessionHref(side.session_id, side.loop_id), class: "mono" }, "#" + (side.position + 1) + " " + side.loop_id),
        " (" + side.continuation + ", " + plural(side.turn_count, "turn") + ")")));
    return h("div", { class: "session-diff" },
      h("p", { class: "muted" }, plural(diff.loops.length, "loop pair") + " in tree order · tokens " +
        signed(diff.usage_delta.total_tokens, tokens(Math.abs(diff.usage_delta.total_tokens))) + " (B − A)"),
      divergenceView(diff.first_divergence, "session-divergence"),
      diff.loops.map((pair, index) => h("section", { class: "diff-pair" }, h("h2", null, "Pair " + (index + 1)), loopDiffView(pair))),
      only.length ? h("ul", { class: "only-in" }, only) : null);
  }

  async function diffView(page, params) {
    // A ref is shown as everywhere (`shown`: bidi controls escaped); one left as shown is
    // sent as given, not as its escapes (which a typed ref may hold as such).
    const given = { a: params.get("a") || "", b: params.get("b") || "" };
    const field = (name, label) => h("label", null, label, h("input", { name, value: shown(given[name]), class: "wide",
      placeholder: "SESSION or SESSION:LOOP (a loop id or #N)" }));
    const form = h("form", { class: "filters panel", id: "diff-form" }, field("a", "A"), field("b", "B"), h("button", { type: "submit" }, "Compare"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const data = new FormData(form);
      const ref = (name) => {
        const text = String(data.get(name) || "");
        return text === shown(given[name]) ? given[name] : text.trim();
      };
      location.hash = "#/diff?" + new URLSearchParams({ a: ref("a"), b: ref("b") });
    });
    append(page, h("h1", null, "Compare two runs"), form);
    if (!params.get("a") || !params.get("b")) {
      append(page, h("p", { class: "muted" }, "Press Compare… on a loop of a session page, then on another loop; or name two " +
        "loops above. A rerun or a branch (a replay, a fork) links to its comparison with its parent."));
      return;
    }
    const query = new URLSearchParams();
    for (const key of ["a", "b", "loop_a", "loop_b"]) if (params.get(key)) query.set(key, params.get(key));
    const diff = await api("api/diff?" + query);
    append(page, diff.diff === "sessions" ? sessionDiffView(diff) : loopDiffView(diff));
  }

  // -- usage ---------------------------------------------------------------------------

  const CHART_PARTS = [["input", "input"], ["output", "output"], ["reasoning", "reasoning"],
    ["cache_read", "cache read"], ["cache_write", "cache write"]];

  // Bars per group, as inline SVG: columns over time for days, rows for models and agents.
  // `measure` says what a bar shows: `total(row)` (null: unknown, drawn as "?" and no
  // bar, never as 0), `parts(row)` its stacked parts ({key, from, value}, CSS class
  // "part-" + key), `text(value)` its figure and `tip(row)` the hover text.
  function barChart(rows, id, label, measure) {
    if (!rows.length) return h("p", { class: "muted", id }, "No usage.");
    const top = Math.max(0, ...rows.map((row) => measure.total(row) || 0));
    const max = top || 1; // nothing known or all zero: no bar has a length
    const note = (row) => measure.total(row) === null ? "unknown" : measure.text(measure.total(row));
    if (id.endsWith("-day")) {
      const height = 180, width = Math.max(320, Math.min(1000, rows.length * 28)), step = width / rows.length;
      const chart = svg("svg", { class: "chart", id, width: width + 70, height: height + 50, role: "img", "aria-label": label });
      append(chart, top ? svg("text", { x: 66, y: 12, class: "tick-label", "text-anchor": "end" }, measure.text(top)) : null,
        svg("line", { x1: 70, x2: 70 + width, y1: height + 16, y2: height + 16, class: "tick" }));
      rows.forEach((row, i) => {
        const x = 70 + i * step + step * 0.15, w = Math.max(2, step * 0.7);
        const group = svg("g", { class: "chart-bar" }, svg("title", null, measure.tip(row)));
        for (const part of measure.parts(row)) {
          const y1 = height + 16 - (part.from + part.value) / max * height;
          append(group, svg("rect", { x, y: y1, width: w, height: Math.max(0.5, part.value / max * height), class: "part-" + part.key }));
        }
        if (measure.total(row) === null) {
          append(group, svg("text", { x: x + w / 2, y: height + 12, class: "bar-note unknown", "text-anchor": "middle" }, "?"));
        }
        if (rows.length <= 16 || i % Math.ceil(rows.length / 16) === 0) {
          append(group, svg("text", { x: x + w / 2, y: height + 32, class: "tick-label", "text-anchor": "middle" }, row.key.slice(5)));
        }
        chart.appendChild(group);
      });
      return chart;
    }
    const width = 560, labelWidth = 260, row = 22;
    const chart = svg("svg", { class: "chart", id, width: labelWidth + width + 110, height: rows.length * row + 8, role: "img",
      "aria-label": label });
    rows.forEach((item, i) => {
      const y = 4 + i * row;
      const text = item.key.length > 36 ? item.key.slice(0, 35) + "…" : item.key;
      const group = svg("g", { class: "chart-bar" }, svg("title", null, measure.tip(item)),
        svg("text", { x: labelWidth - 6, y: y + 14, class: "bar-label", "text-anchor": "end" }, text));
      for (const part of measure.parts(item)) {
        append(group, svg("rect", { x: labelWidth + part.from / max * width, y: y + 2, width: Math.max(0.5, part.value / max * width),
          height: row - 6, class: "part-" + part.key }));
      }
      const known = measure.total(item) !== null;
      append(group, svg("text", { x: labelWidth + (known ? measure.total(item) / max * width : 0) + 6, y: y + 14,
        class: "bar-note" + (known ? "" : " unknown") }, note(item)));
      chart.appendChild(group);
    });
    return chart;
  }

  const groupTip = (row) => plural(row.sessions, "session") + ", " + plural(row.loops, "loop");

  // Stacked token kinds per group (the parts may not add up to total_tokens: scaled to it).
  const TOKENS = {
    total: (row) => countedTotal(row.usage),
    parts: (row) => {
      let sum = 0;
      const parts = CHART_PARTS.map(([key, label]) => {
        const value = Number(row.usage[key] || 0);
        const part = { key, label, from: sum, value };
        sum += value;
        return part;
      }).filter((part) => part.value > 0);
      const scale = countedTotal(row.usage) / Math.max(sum, 1);
      return parts.map((part) => Object.assign(part, { from: part.from * scale, value: part.value * scale }));
    },
    text: tokens,
    tip: (row) => row.key + "\n" + usageText(row.usage) + "\n" + groupTip(row),
  };

  // Cost in USD per group; unknown (a model without a price) is shown as such, never as $0.
  const COST = {
    total: (row) => row.cost && row.cost.usd !== null && row.cost.usd !== undefined ? Number(row.cost.usd) : null,
    parts: (row) => COST.total(row) ? [{ key: "cost", from: 0, value: COST.total(row) }] : [],
    text: (usd) => costText({ usd }),
    tip: (row) => row.key + "\n" + costText(row.cost) + ((row.cost.sources || []).length ? " · prices: " + row.cost.sources.join(", ") : "") +
      "\n" + tokens(row.usage.total_tokens) + " tokens\n" + groupTip(row),
  };

  function usageChart(rows, by) {
    return barChart(rows, "chart-" + by, "tokens by " + by, TOKENS);
  }

  function costChart(rows, by) {
    return barChart(rows, "cost-chart-" + by, "cost in USD by " + by, COST);
  }

  function chartLegend() {
    return h("div", { class: "legend chart-legend" }, CHART_PARTS.map(([key, label]) => h("span", { class: "legend-part-" + key }, label)));
  }

  async function statsView(page, params) {
    const by = params.get("by") || "agent";
    const select = h("select", { name: "by", id: "stats-by" },
      ["agent", "model", "day"].map((value) => h("option", { value }, "by " + value)));
    select.value = by;
    select.addEventListener("change", () => { location.hash = "#/stats?by=" + encodeURIComponent(select.value); });
    const groupings = ["day", "model", "agent"];
    const [days, models, agents] = await Promise.all(groupings.map((key) => api("api/stats?by=" + key)));
    // Tokens draw at once; cost, priced loop by loop on the server, fills in when it comes.
    const costHolders = Object.fromEntries(groupings.map((key) => [key, h("div", { class: "cost-chart" },
      h("p", { class: "muted" }, "Pricing…"))]));
    const panel = (title, ...content) => h("section", { class: "panel chart-panel" }, h("h2", null, title), content);
    append(page, h("h1", null, "Usage"),
      h("div", { class: "charts" },
        panel("Tokens by day", chartLegend(), usageChart(days, "day")),
        panel("Cost by day (USD)", costHolders.day),
        panel("Tokens by model", usageChart(models, "model")),
        panel("Cost by model (USD)", costHolders.model),
        panel("Tokens by agent", usageChart(agents, "agent")),
        panel("Cost by agent (USD)", costHolders.agent)),
      h("h2", null, "Totals"), h("div", { class: "toolbar" }, select));
    const priced = Promise.all(groupings.map((key) => optional("api/cost?by=" + key)));
    priced.then((bodies) => groupings.forEach((key, i) => {
      clear(costHolders[key]);
      const body = bodies[i];
      append(costHolders[key], body ? costChart(body.totals, key) : h("p", { class: "muted" }, "Cost unavailable."));
    }));
    const rows = { day: days, model: models, agent: agents }[by] || await api("api/stats?by=" + encodeURIComponent(by));
    const costs = groupings.includes(by) ? (await priced)[groupings.indexOf(by)] : await optional("api/cost?by=" + encodeURIComponent(by));
    const costOf = new Map(((costs || {}).totals || []).map((total) => [total.key, total.cost]));
    const columns = ["input", "output", "reasoning", "cache_read", "cache_write", "total_tokens"];
    append(page, h("div", { class: "table-wrap" }, h("table", { class: "data", id: "stats" },
      h("thead", null, h("tr", null, h("th", null, by), h("th", { class: "num" }, "Sessions"), h("th", { class: "num" }, "Loops"),
        columns.map((c) => h("th", { class: "num" }, c.replace("_", " "))), costs ? h("th", { class: "num" }, "Cost (USD)") : null)),
      h("tbody", null, rows.map((row) => h("tr", null, h("td", { class: "mono" }, row.key),
        h("td", { class: "num" }, tokens(row.sessions)), h("td", { class: "num" }, tokens(row.loops)),
        columns.map((c) => h("td", { class: "num" }, tokens(row.usage[c]))),
        costs ? h("td", { class: "num cost" }, costText(costOf.get(row.key))) : null))))));
    if (costs && costs.hint) append(page, h("p", { class: "muted" }, costs.hint));
  }

  // -- search ------------------------------------------------------------------------------

  // The snippet as text, its highlighted ranges in <mark> (offsets in characters).
  function snippetView(hit) {
    const text = String(hit.snippet || "");
    const chars = Array.from(text);
    const parts = [];
    let at = 0;
    for (const [start, end] of hit.highlights || []) {
      if (start < at || end > chars.length || end <= start) continue;
      parts.push(chars.slice(at, start).join(""), h("mark", null, chars.slice(start, end).join("")));
      at = end;
    }
    parts.push(chars.slice(at).join(""));
    return h("span", { class: "snippet" }, parts);
  }

  async function searchView(page, params) {
    const text = params.get("q") || "";
    const box = document.querySelector("#search-form input[name=q]");
    if (box) box.value = text;
    append(page, h("h1", null, "Search"));
    if (!text.trim()) {
      append(page, h("p", { class: "muted" }, "Type words to find in messages, thinking, tool arguments and results."));
      return;
    }
    const hits = await api("api/search?" + new URLSearchParams({ q: text, limit: "100" }));
    append(page, h("p", { class: "muted" }, h("span", { id: "hit-count" }, plural(hits.length, "hit")), " for ", h("code", null, text)));
    append(page, h("div", { class: "table-wrap" }, h("table", { class: "data", id: "hits" },
      h("thead", null, h("tr", null, ["Session", "Loop", "Turn", "Where", "Snippet"].map((t) => h("th", null, t)))),
      h("tbody", null, hits.map((hit) => {
        const href = sessionHref(hit.session_id, hit.loop_id) + (hit.turn_index === null ? "" : "&turn=" + hit.turn_index);
        return h("tr", null,
          h("td", { class: "nowrap" }, h("a", { href, class: "mono hit-link" }, hit.session_id)),
          h("td", { class: "mono clip", title: hit.loop_id }, hit.loop_id),
          h("td", { class: "num" }, hit.turn_index === null ? "" : hit.turn_index),
          h("td", null, String(hit.kind)),
          h("td", null, snippetView(hit)));
      })))));
  }

  const searchForm = document.getElementById("search-form");
  if (searchForm) {
    searchForm.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = String(new FormData(searchForm).get("q") || "").trim();
      location.hash = "#/search?" + new URLSearchParams({ q: text });
    });
  }

  window.addEventListener("hashchange", route);
  route();
})();
