// The cbir page: plain JavaScript over the service's HTTP API (/api/v1), nothing fetched from elsewhere.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { role: null, database: null };
const EDITOR_ROLES = ["editor", "admin"];

function token() { return sessionStorage.getItem("cbir-token") || ""; }

// Every API call: the token (if any) sent, a JSON error body turned into an Error with its message.
async function call(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  const response = await fetch(`/api/v1${path}`, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}
const json = async (path, options) => (await call(path, options)).json();
const db = () => encodeURIComponent(state.database);

function showError(error) {
  const box = $("#error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

function element(tag, properties = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, properties);
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

const percent = (share) => `${Math.round(share * 100)}%`;

// ------------------------------------------------------------------ who and which database
async function start() {
  $("#token").value = token();
  try {
    const who = await json("/whoami");
    state.role = who.role;
    $("#who").textContent = `${who.name} (${who.role})`;
  } catch (error) {
    state.role = null;
    $("#who").textContent = "";
    showError(error);
    return;
  }
  $("#tab-manage").hidden = !EDITOR_ROLES.includes(state.role);
  const { databases } = await json("/databases");
  const select = $("#database");
  select.replaceChildren(...databases.map((d) => element("option", {
    value: d.name, textContent: d.error ? `${d.name} (unreadable)` : `${d.name} (${d.images} images)` })));
  if (!databases.length) { showError("no database on this Redis yet: `cbir add` makes one"); return; }
  const remembered = sessionStorage.getItem("cbir-database");
  select.value = databases.some((d) => d.name === remembered) ? remembered : databases[0].name;
  await chooseDatabase();
}

async function chooseDatabase() {
  state.database = $("#database").value;
  sessionStorage.setItem("cbir-database", state.database);
  showError(null);
  try {
    showFacts(await json(`/databases/${db()}`));
  } catch (error) { showError(error); }
  if (location.hash === "#manage") loadAudit();
}

function showLabelFilter(classes) {
  const box = $("#label-filter");
  box.replaceChildren(box.querySelector("legend"), ...Object.keys(classes).map((label) =>
    element("label", { className: "check" },
      element("input", { type: "checkbox", name: "label", value: label }), ` ${label}`)));
}

// ------------------------------------------------------------------ views
function showView() {
  let view = (location.hash || "#search").slice(1);
  if (view === "manage" && !EDITOR_ROLES.includes(state.role)) view = "search";
  for (const name of ["search", "database", "manage"]) {
    $(`#view-${name}`).hidden = name !== view;
    const tab = $(`#tab-${name}`);
    if (name === view) tab.setAttribute("aria-current", "page"); else tab.removeAttribute("aria-current");
  }
  if (view === "manage" && state.database) loadAudit();
}

// ------------------------------------------------------------------ search
async function search(event) {
  event.preventDefault();
  const file = $("#query").files[0];
  if (!file) { showError("choose an image to search with"); return; }
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("#k").value);
  form.append("preview", "true");
  if ($("#rerank").checked) form.append("rerank", "true");
  for (const box of document.querySelectorAll("#label-filter input:checked")) form.append("label", box.value);
  for (const project of $("#projects").value.split(",").map((p) => p.trim()).filter(Boolean)) form.append("project", project);
  showError(null);
  $("#search-status").textContent = `Searching '${state.database}' for images like ${file.name}…`;
  $("#answers").replaceChildren();
  try {
    const answer = await json(`/databases/${db()}/search`, { method: "POST", body: form });
    $("#search-status").textContent = answer.reranked ? "Re-ranked by k-reciprocal neighbours." : "";
    $("#answers").replaceChildren(...answer.results.map((result) => showAnswer(result, answer.timings_ms)));
  } catch (error) {
    $("#search-status").textContent = "";
    showError(error);
  }
}

function showAnswer(result, timings) {
  const voters = result.voters || 1;
  const vote = element("div", { className: "vote" },
    element("h3", { textContent: `Vote: ${result.vote_summary}` }),
    element("ul", { className: "shares", ariaLabel: "Each label's share of the votes" },
      ...Object.entries(result.votes).map(([label, n]) =>
        element("li", {},
          element("span", { className: "share-label", textContent: `${label} ${percent(n / voters)}` }),
          element("meter", { min: 0, max: 1, value: n / voters, ariaHidden: "true" })))));
  const query = element("figure", { className: "query" },
    result.query_thumbnail ? element("img", { src: result.query_thumbnail, alt: `The query image, ${result.query}` }) : null,
    element("figcaption", { textContent: `Query: ${result.query}` }));
  const list = element("ol", { className: "neighbours", ariaLabel: `${result.results.length} nearest stored images` },
    ...result.results.map(showNeighbour));
  const spent = element("p", { className: "quiet timings",
    textContent: "Time: " + Object.entries(timings).map(([step, ms]) => `${step} ${ms} ms`).join(" · ") });
  return element("article", { className: "answer" }, element("div", { className: "head" }, query, vote), list, spent);
}

function showNeighbour(neighbour) {
  const picture = element("img", { alt: `Stored image ${neighbour.name}, labelled ${neighbour.label}`, width: 128, height: 128 });
  loadThumbnail(picture, neighbour.id);
  const card = element("li", { className: "neighbour" }, picture,
    element("dl", {},
      element("dt", { textContent: "Name" }), element("dd", { textContent: neighbour.name, className: "name" }),
      element("dt", { textContent: "Label" }), element("dd", { textContent: neighbour.label, className: "label" }),
      element("dt", { textContent: "Project" }), element("dd", { textContent: neighbour.project || "—" }),
      element("dt", { textContent: "Similarity" }), element("dd", { textContent: neighbour.score.toFixed(3) })));
  if (EDITOR_ROLES.includes(state.role)) {
    card.append(element("button", { type: "button", className: "danger forget", textContent: "Forget",
      ariaLabel: `Forget ${neighbour.name}`, onclick: () => forgetOne(neighbour, card) }));
  }
  return card;
}

// Thumbnails are fetched with the token (an <img src> cannot send one) and shown as blob: URLs.
async function loadThumbnail(picture, id) {
  try {
    const blob = await (await call(`/databases/${db()}/images/${id}/thumbnail`)).blob();
    picture.src = URL.createObjectURL(blob);
  } catch (_) {
    picture.replaceWith(element("div", { className: "no-thumbnail", textContent: "no thumbnail" }));
  }
}

// ------------------------------------------------------------------ database
function showDatabase(facts) {
  const index = facts.index.kind === "exact" ? "none: exact search" : `${facts.index.kind}, recall@10 ${facts.index.recall10.toFixed(3)}`;
  const rows = [["Images", facts.images], ["Classes", Object.keys(facts.classes).length], ["Model", facts.model],
    ["Vector size", facts.dim], ["Trained index", index], ["Data version", facts.version]];
  $("#database-facts").replaceChildren(...rows.flatMap(([term, value]) =>
    [element("dt", { textContent: term }), element("dd", { textContent: String(value) })]));
  const most = Math.max(1, ...Object.values(facts.classes));
  $("#class-chart tbody").replaceChildren(...Object.entries(facts.classes).map(([label, n]) =>
    element("tr", {}, element("th", { scope: "row", textContent: label }), element("td", { textContent: String(n) }),
      element("td", {}, bar((100 * n) / most)))));
  const picture = $("#tsne");
  picture.hidden = true;
  $("#tsne-none").hidden = facts.tsne;
  if (facts.tsne) {
    call(`/databases/${db()}/tsne`).then((r) => r.blob()).then((blob) => {
      picture.src = URL.createObjectURL(blob);
      picture.hidden = false;
    }).catch(showError);
  }
}

function bar(width) {
  const span = element("span", { className: "bar" });
  span.style.width = `${width}%`; // through the CSSOM, which the page's content security policy allows
  return span;
}

// ------------------------------------------------------------------ manage
function confirmed(text) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  dialog.returnValue = "cancel";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true }));
}

async function forgetOne(neighbour, card) {
  if (!(await confirmed(`Forget ${neighbour.name} (${neighbour.label}) from '${state.database}'? No search will return it again.`))) return;
  try {
    await json(`/databases/${db()}/images/${neighbour.id}`, { method: "DELETE" });
    card.replaceChildren(element("p", { className: "gone", textContent: `Forgot ${neighbour.name}.` }));
    refreshCounts();
  } catch (error) { showError(error); }
}

async function forgetMatching(event) {
  event.preventDefault();
  const name = $("#forget-name").value.trim(), label = $("#forget-label").value.trim();
  if (!name && !label) { showError("give a name or a label to forget"); return; }
  const what = [name && `the image named ${name}`, label && `every image labelled ${label}`].filter(Boolean).join(" and ");
  if (!(await confirmed(`Forget ${what} from '${state.database}'?`))) return;
  const query = new URLSearchParams();
  if (name) query.append("name", name);
  if (label) query.append("label", label);
  try {
    const answer = await json(`/databases/${db()}/images?${query}`, { method: "DELETE" });
    const missing = [...answer.missing.names, ...answer.missing.labels];
    $("#forget-status").textContent = `Forgot ${answer.forgotten.length} image(s).` + (missing.length ? ` Not stored: ${missing.join(", ")}.` : "");
    refreshCounts();
  } catch (error) { showError(error); }
}

async function addImages(event) {
  event.preventDefault();
  const form = new FormData();
  for (const file of $("#add-files").files) form.append("image", file);
  form.append("label", $("#add-label").value.trim());
  form.append("project", $("#add-project").value.trim());
  $("#add-status").textContent = "Adding…";
  showError(null);
  try {
    const report = await json(`/databases/${db()}/images`, { method: "POST", body: form });
    const parts = [`Added ${report.new}`, `${report.unchanged} already stored`];
    if (report.conflicts.length) parts.push(`${report.conflicts.length} conflict(s): ${report.conflicts.join("; ")}`);
    if (report.failures.length) parts.push(`${report.failures.length} unreadable: ${report.failures.join("; ")}`);
    $("#add-status").textContent = parts.join(" · ");
    refreshCounts();
  } catch (error) {
    $("#add-status").textContent = "";
    showError(error);
  }
}

async function loadAudit() {
  try {
    const { entries } = await json(`/databases/${db()}/audit`);
    $("#audit tbody").replaceChildren(...entries.map((entry) => element("tr", {},
      element("td", { textContent: new Date(entry.when * 1000).toLocaleString() }),
      element("td", { textContent: `${entry.who} (${entry.role})` }),
      element("td", { textContent: entry.what }))));
  } catch (error) { showError(error); }
}

async function refreshCounts() {
  showFacts(await json(`/databases/${db()}`));
  loadAudit();
}

function showFacts(facts) {
  $("#database-summary").textContent = `${facts.images} images · ${facts.model}`;
  $("#database").selectedOptions[0].textContent = `${facts.name} (${facts.images} images)`;
  showLabelFilter(facts.classes);
  showDatabase(facts);
}

// ------------------------------------------------------------------ wiring
function useToken(event) {
  event.preventDefault();
  sessionStorage.setItem("cbir-token", $("#token").value.trim());
  showError(null);
  start().then(showView);
}

function dropZone() {
  const zone = $("#drop"), input = $("#query");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      $("#search-form").requestSubmit();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("#search-form").addEventListener("submit", search);
  $("#add-form").addEventListener("submit", addImages);
  $("#forget-form").addEventListener("submit", forgetMatching);
  $("#token-form").addEventListener("submit", useToken);
  $("#database").addEventListener("change", chooseDatabase);
  window.addEventListener("hashchange", showView);
  dropZone();
  start().then(showView);
});
