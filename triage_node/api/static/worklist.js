// The worklist page: polls /api/worklist, shows a series' detail, posts verdicts.
// Credentials live in sessionStorage only (gone when the tab closes).
"use strict";

const POLL_MS = Number(new URLSearchParams(location.search).get("poll_ms")) || 5000;
const SUBTYPES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid",
  "subdural"];
const state = { rows: [], rowsJson: "", sortKey: "priority", desc: false, selected: null, who: null,
  timer: null, objectUrls: [] };

function authHeaders() {
  const h = { "X-Requested-With": "triage-node" };
  const a = sessionStorage.getItem("triage-auth");
  if (a) h.Authorization = a;
  return h;
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options,
    headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (res.status === 401) {
    showLogin();
    throw new Error("authentication required");
  }
  return res;
}

function $(id) { return document.getElementById(id); }
function text(value) { return value === null || value === undefined ? "" : String(value); }
function pct(p) { return p === null || p === undefined ? "" : (100 * p).toFixed(0) + " %"; }
function when(iso) { return iso ? iso.replace("T", " ").slice(0, 19) : ""; }
function secs(s) {
  if (s === null || s === undefined) return "";
  return s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
}

function showLogin() {
  $("app").hidden = true;
  $("login").hidden = false;
  if (state.timer) { clearInterval(state.timer); state.timer = null; }
}

async function probe(header) {
  const h = { "X-Requested-With": "triage-node" };
  if (header) h.Authorization = header;
  const res = await fetch("/api/session", { headers: h });
  return res.ok ? res.json() : null;
}

async function login(event) {
  event.preventDefault();
  const user = $("login-user").value.trim();
  const secret = $("login-secret").value;
  $("login-error").textContent = "";
  const basic = "Basic " + btoa(unescape(encodeURIComponent(user + ":" + secret)));
  const bearer = "Bearer " + secret;
  for (const header of [basic, bearer]) {
    const who = await probe(header);
    if (who) {
      sessionStorage.setItem("triage-auth", header);
      if (who.method !== "basic") localStorage.setItem("triage-user", user);
      return start(who);
    }
  }
  $("login-error").textContent = "Not accepted.";
}

function start(who) {
  state.who = who;
  $("login").hidden = true;
  $("app").hidden = false;
  $("whoami").textContent = who.user ? "signed in as " + who.user : "";
  $("fb-user-label").hidden = who.method === "basic";
  $("fb-user").value = localStorage.getItem("triage-user") || "";
  refresh();
  if (!state.timer) state.timer = setInterval(refresh, POLL_MS);
}

function sortValue(row, key, index) {
  switch (key) {
    case "priority": return index;
    case "any": return row.probabilities ? row.probabilities.any : -1;
    case "subtypes": return row.probabilities
      ? Math.max(...SUBTYPES.map((s) => row.probabilities[s])) : -1;
    case "sr": return row.sr_delivery ? row.sr_delivery.state : "";
    case "feedback": return row.feedback ? (row.feedback.ich ? 1 : 0) : -1;
    default: return row[key] === null || row[key] === undefined ? "" : row[key];
  }
}

function render() {
  const indexed = state.rows.map((row, i) => [row, i]);
  indexed.sort((a, b) => {
    const va = sortValue(a[0], state.sortKey, a[1]);
    const vb = sortValue(b[0], state.sortKey, b[1]);
    const c = va < vb ? -1 : va > vb ? 1 : a[1] - b[1];
    return state.desc ? -c : c;
  });
  const body = document.querySelector("#worklist tbody");
  body.replaceChildren(...indexed.map(([row, i]) => {
    const tr = document.createElement("tr");
    tr.dataset.series = row.series_instance_uid;
    if (row.flagged) tr.classList.add("flagged");
    if (row.series_instance_uid === state.selected) tr.classList.add("selected");
    const top = row.probabilities
      ? SUBTYPES.filter((s) => row.probabilities[s] >= 0.5).join(", ") : "";
    const verdict = row.feedback ? (row.feedback.ich ? "ICH" : "no ICH") + " (" +
      row.feedback.user + ")" : "";
    const cells = [i + 1, pct(row.probabilities && row.probabilities.any), row.patient_id,
      row.accession_number, row.study_description, row.series_description,
      when(row.arrived_at), row.state.replace("_", " "), top,
      row.sr_delivery ? row.sr_delivery.state : "", secs(row.time_to_result_seconds),
      verdict];
    for (const value of cells) {
      const td = document.createElement("td");
      td.textContent = text(value);
      tr.appendChild(td);
    }
    tr.children[7].className = "state-" + row.state;
    tr.addEventListener("click", () => select(row.series_instance_uid));
    return tr;
  }));
}

async function refresh() {
  const params = new URLSearchParams();
  if ($("filter-state").value) params.append("state", $("filter-state").value);
  if ($("filter-hours").value) params.append("hours", $("filter-hours").value);
  try {
    const res = await api("/api/worklist?" + params);
    if (!res.ok) throw new Error("HTTP " + res.status);
    const data = await res.json();
    $("updated").textContent = "updated " + when(data.at) + " UTC, " + data.count + " series";
    $("status").textContent = "";
    const fresh = JSON.stringify(data.rows);
    if (fresh !== state.rowsJson) {  // re-draw only on change: hover and focus survive
      state.rowsJson = fresh;
      state.rows = data.rows;
      render();
    }
  } catch (err) {
    $("status").textContent = "worklist not updated: " + err.message;
  }
}

async function image(uid, overlay, element) {
  const res = await api("/api/series/" + encodeURIComponent(uid) + "/key.png?overlay=" +
    overlay);
  if (!res.ok) return false;
  const url = URL.createObjectURL(await res.blob());
  state.objectUrls.push(url);
  element.src = url;
  return true;
}

function curve(slices) {
  const svg = $("curve");
  if (!slices.length) { svg.replaceChildren(); return; }
  const n = Math.max(slices.length - 1, 1);
  const points = slices.map((s, i) => (400 * i / n).toFixed(1) + "," +
    (100 - 100 * s.any).toFixed(1)).join(" ");
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points);
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#b00020");
  line.setAttribute("stroke-width", "2");
  line.setAttribute("vector-effect", "non-scaling-stroke");
  svg.replaceChildren(line);
}

async function select(uid) {
  state.selected = uid;
  render();
  const res = await api("/api/series/" + encodeURIComponent(uid));
  if (!res.ok) { $("status").textContent = "series not found"; return; }
  const d = await res.json();
  $("detail").hidden = false;
  $("detail").dataset.series = uid;
  $("detail-title").textContent = (d.flagged ? "FLAGGED - " : "") + "Patient " +
    d.patient_id + ", accession " + d.accession_number;
  $("detail-meta").textContent = [d.study_description, d.series_description,
    d.instance_count + " slices", d.state.replace("_", " ")].filter(Boolean).join(" | ");
  state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  state.objectUrls = [];
  $("img-plain").removeAttribute("src");
  $("img-heatmap").removeAttribute("src");
  let shown = false;
  if (d.key_image) {
    shown = await image(uid, "none", $("img-plain"));
    shown = (await image(uid, "heatmap", $("img-heatmap"))) && shown;
    $("heatmap-caption").textContent = "Where the model looked (" + d.key_image.method + ")";
  }
  $("images").hidden = !shown;
  $("no-images").hidden = shown;
  curve(d.slices);
  const probs = $("probabilities").querySelector("tbody");
  probs.replaceChildren(...Object.entries(d.probabilities || {}).map(([k, v]) => {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td></td><td></td>";
    tr.children[0].textContent = k;
    tr.children[1].textContent = pct(v);
    return tr;
  }));
  const t = d.timings;
  const facts = [["Arrived", when(t.arrived_at)], ["Last slice", when(t.last_received_at)],
    ["Inference", secs(t.inference_seconds)], ["Time to result", secs(t.time_to_result_seconds)],
    ["Model", d.model ? d.model.name + " " + d.model.version : ""],
    ["Threshold", d.threshold === null ? "" : d.threshold.toFixed(3)],
    ["SR delivery", d.sr_delivery ? d.sr_delivery.state : "none"],
    ["Key slices", d.key_slices.map((k) => "#" + (k.index + 1) + " " +
      pct(k.probabilities.any)).join(", ")]];
  $("timings").replaceChildren(...facts.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    return [dt, dd];
  }));
  const audit = $("audit").querySelector("tbody");
  const entries = d.audit.filter((e) => e.kind !== "instance_stored");
  const stored = d.audit.length - entries.length;
  audit.replaceChildren(...entries.map((e) => {
    const tr = document.createElement("tr");
    for (const v of [when(e.at), e.kind, e.actor, e.outcome, e.detail]) {
      const td = document.createElement("td"); td.textContent = text(v); tr.appendChild(td);
    }
    return tr;
  }));
  if (stored) {
    const tr = document.createElement("tr");
    const td = document.createElement("td"); td.colSpan = 5;
    td.textContent = stored + " instance(s) stored";
    tr.appendChild(td); audit.prepend(tr);
  }
  const fs = $("fb-subtypes");
  fs.querySelectorAll("label").forEach((l) => l.remove());
  for (const s of SUBTYPES) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.name = "subtype"; box.value = s;
    box.checked = d.feedback ? d.feedback.subtypes[s] : false;
    label.append(box, " " + s);
    fs.appendChild(label);
  }
  $("fb-status").textContent = d.feedback ? "Last verdict: " +
    (d.feedback.ich ? "ICH" : "no ICH") + " by " + d.feedback.user + " at " +
    when(d.feedback.at) : "";
}

async function sendFeedback(ich) {
  const uid = state.selected;
  if (!uid) return;
  const subtypes = {};
  document.querySelectorAll("#fb-subtypes input[name=subtype]").forEach((b) => {
    subtypes[b.value] = ich && b.checked;
  });
  const body = { ich, subtypes, comment: $("fb-comment").value,
    user: $("fb-user").value.trim() };
  if (state.who.method !== "basic") {
    if (!body.user) { $("fb-status").textContent = "Please enter your name."; return; }
    localStorage.setItem("triage-user", body.user);
  }
  const res = await api("/api/series/" + encodeURIComponent(uid) + "/feedback", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  if (res.ok) {
    const saved = await res.json();
    $("fb-status").textContent = "Saved: " + (saved.ich ? "ICH" : "no ICH") + " by " +
      saved.user;
    $("fb-comment").value = "";
    refresh();
  } else {
    const err = await res.json().catch(() => ({}));
    $("fb-status").textContent = "Not saved: " + (typeof err.detail === "string"
      ? err.detail : "HTTP " + res.status);
  }
}

function init() {
  document.querySelectorAll("#worklist th").forEach((th) => {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      state.desc = state.sortKey === key ? !state.desc : key === "any";
      state.sortKey = key;
      document.querySelectorAll("#worklist th").forEach((h) => {
        h.classList.toggle("sorted", h === th);
        h.classList.toggle("desc", h === th && state.desc);
      });
      render();
    });
  });
  $("filter-state").addEventListener("change", refresh);
  $("filter-hours").addEventListener("change", refresh);
  $("login-form").addEventListener("submit", login);
  $("fb-confirm").addEventListener("click", () => sendFeedback(true));
  $("fb-refute").addEventListener("click", () => sendFeedback(false));
  $("detail-close").addEventListener("click", () => {
    $("detail").hidden = true; state.selected = null; render();
  });
  probe(sessionStorage.getItem("triage-auth")).then((who) => who ? start(who) : showLogin());
}

init();
