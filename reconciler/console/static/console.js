// The console's only script: asks before an action, and moves the progress bars live
// from the API's server-sent events (no reload). Pages work without it.
"use strict";

function confirmActions() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
}

function showProgress(scope, p) {
  const done = p.files_succeeded + p.files_failed;
  const bar = scope.querySelector("[data-bar]");
  if (bar) {
    bar.max = Math.max(p.total_files, 1);
    bar.value = done;
    bar.textContent = done + "/" + p.total_files;
  }
  const count = scope.querySelector("[data-count]");
  if (count) count.textContent = done + "/" + p.total_files;
  const failed = scope.querySelector("[data-failed]");
  if (failed) failed.textContent = p.files_failed ? p.files_failed + " failed" : "";
  const states = scope.querySelector("[data-states]");
  if (states && p.files_pending !== undefined) {
    states.textContent = p.files_pending + " pending · " + p.files_processing + " processing · " +
      p.files_succeeded + " succeeded · " + p.files_failed + " failed";
  }
}

const TONES = { completed: "ok", completed_with_errors: "warn", processing: "run" };

function showFinalized(scope, summary) {
  showProgress(scope, { ...summary, files_pending: 0, files_processing: 0 });
  const status = scope.querySelector("[data-status]");
  if (status) {
    status.textContent = summary.status;
    status.className = "status " + (TONES[summary.status] || "idle");
  }
  const by = scope.querySelector("[data-finalized-by]");
  if (by) by.textContent = summary.finalized_by;
  const when = scope.querySelector("[data-completed]");
  if (when) when.textContent = summary.completed_at.replace("T", " ").slice(0, 19) + "Z";
}

// A complete batch is finalized within moments, but `finalized` on the all-batches
// stream waits for every older transaction on the server to end: read the batch
// itself a few times rather than show it as processing meanwhile.
const SETTLE_DELAYS_MS = [200, 500, 1000, 2000, 4000];

async function settle(row, batchId) {
  for (const delay of SETTLE_DELAYS_MS) {
    await new Promise((done) => setTimeout(done, delay));
    const answer = await fetch("/api/batches/" + encodeURIComponent(batchId));
    if (!answer.ok) return;
    const p = await answer.json();
    if (p.status !== "processing") {
      showFinalized(row, p);
      return;
    }
  }
}

function followList(table) {
  const rows = new Map();
  for (const row of table.querySelectorAll("tr[data-batch-id]")) rows.set(row.dataset.batchId, row);
  const live = [...rows.values()].some((r) => r.querySelector("[data-status]").textContent.startsWith("processing"));
  if (!live) return;
  const source = new EventSource("/api/events?progress=1");
  source.addEventListener("progress", (event) => {
    const p = JSON.parse(event.data);
    const row = rows.get(p.batch_id);
    if (!row) return;
    showProgress(row, p);
    if (p.files_succeeded + p.files_failed === p.total_files) settle(row, p.batch_id);
  });
  source.addEventListener("finalized", (event) => {
    const summary = JSON.parse(event.data).data;
    const row = rows.get(summary.batch_id);
    if (row) showFinalized(row, summary);
  });
  window.addEventListener("pagehide", () => source.close());
}

function followBatch(head) {
  const status = head.querySelector("[data-status]");
  if (!status.textContent.startsWith("processing")) return;
  const source = new EventSource(head.dataset.liveBatch);
  source.addEventListener("progress", (event) => showProgress(head, JSON.parse(event.data)));
  source.addEventListener("finalized", (event) => {
    source.close();
    showFinalized(head, JSON.parse(event.data).data);
    head.querySelector("[data-reload]").hidden = false;
  });
  window.addEventListener("pagehide", () => source.close());
}

document.addEventListener("DOMContentLoaded", () => {
  confirmActions();
  const table = document.querySelector("[data-live-batches]");
  if (table) followList(table);
  const head = document.querySelector("[data-live-batch]");
  if (head) followBatch(head);
});
