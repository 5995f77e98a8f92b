'use strict';
// The BullMQ peer of `python -m bench versus-bullmq`: one flow per batch (a parent
// job with F no-op children), run by two workers in this process; prints one JSON line.
//
// node flows.js --batches 200 --files 50 --redis-url redis://127.0.0.1:6379/0 \
//     --prefix bench-bullmq-abc [--child-concurrency 32] [--parent-concurrency 16]
//
// The clock runs from the first flow submitted to the last parent completed, as seen
// by this process; every key under the prefix is deleted at the end.

const fs = require('node:fs');
const { performance } = require('node:perf_hooks');
const { randomBytes } = require('node:crypto');
const { parseArgs } = require('node:util');
const { FlowProducer, Worker } = require('bullmq');
const IORedis = require('ioredis');

const CHILD_QUEUE = 'files';
const PARENT_QUEUE = 'batches';
const DELETE_CHUNK = 1000;

function options() {
  const { values } = parseArgs({
    options: {
      batches: { type: 'string', default: '200' },
      files: { type: 'string', default: '50' },
      'child-concurrency': { type: 'string', default: '32' },
      'parent-concurrency': { type: 'string', default: '16' },
      submitters: { type: 'string', default: '8' },
      'redis-url': { type: 'string', default: 'redis://127.0.0.1:6379/0' },
      prefix: { type: 'string', default: `bench-bullmq-${randomBytes(5).toString('hex')}` },
      'timeout-s': { type: 'string', default: '600' },
      'clock-ticks': { type: 'string', default: '100' },
      'remove-on-complete': { type: 'boolean', default: false },
    },
  });
  const number = (name) => {
    const value = Number(values[name]);
    if (!Number.isFinite(value) || value <= 0) throw new Error(`--${name} must be > 0`);
    return value;
  };
  return {
    batches: number('batches'),
    files: number('files'),
    childConcurrency: number('child-concurrency'),
    parentConcurrency: number('parent-concurrency'),
    submitters: number('submitters'),
    timeoutS: number('timeout-s'),
    clockTicks: number('clock-ticks'),
    redisUrl: values['redis-url'],
    prefix: values.prefix,
    removeOnComplete: values['remove-on-complete'],
  };
}

// BullMQ takes ioredis options, not a URL; it makes its own (blocking) connections.
function connection(url) {
  const parts = new URL(url);
  return {
    host: parts.hostname || '127.0.0.1',
    port: Number(parts.port || 6379),
    db: Number(parts.pathname.slice(1) || 0),
    username: decodeURIComponent(parts.username) || undefined,
    password: decodeURIComponent(parts.password) || undefined,
  };
}

// CPU seconds (user + system, all threads) of a process, as bench/cpu.py reads them.
function cpuS(pid, clockTicks) {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / clockTicks;
  } catch {
    return null; // not on Linux, or Redis runs elsewhere
  }
}

// Busy, stolen and total CPU seconds of the host so far, from /proc/stat (guest is in
// user). Steal is time the hypervisor ran something else: neither busy here nor idle.
function hostS(clockTicks) {
  try {
    const first = fs.readFileSync('/proc/stat', 'utf8').split('\n', 1)[0];
    const fields = first.split(/\s+/).slice(1, 9).map(Number);
    const total = fields.reduce((a, b) => a + b, 0);
    const busy = total - fields[3] - fields[4] - fields[7];
    return { busy: busy / clockTicks, steal: fields[7] / clockTicks, total: total / clockTicks };
  } catch {
    return null;
  }
}

function hostBusy(before, after) {
  if (!before || !after || after.total <= before.total) {
    return { busy_s: null, busy_pct: null, steal_s: null };
  }
  const busy = after.busy - before.busy;
  return {
    busy_s: round(busy),
    busy_pct: round((100 * busy) / (after.total - before.total), 1),
    steal_s: round(after.steal - before.steal),
  };
}

async function redisPid(admin) {
  const info = await admin.info('server');
  const match = /process_id:(\d+)/.exec(info);
  return match ? Number(match[1]) : null;
}

// Linear interpolation between ranks, like Postgres's percentile_cont.
function percentile(sorted, fraction) {
  if (!sorted.length) return null;
  const rank = fraction * (sorted.length - 1);
  const low = Math.floor(rank);
  const high = Math.min(low + 1, sorted.length - 1);
  return sorted[low] + (sorted[high] - sorted[low]) * (rank - low);
}

function round(value, digits = 3) {
  return value === null ? null : Number(value.toFixed(digits));
}

// What the workers saw: when each batch's last child and its parent completed.
class Tally {
  constructor(batches) {
    this.batches = batches;
    this.lastChildAt = new Map();
    this.latencyMs = [];
    this.childrenDone = 0;
    this.childrenFailed = 0;
    this.parentsDone = 0;
    this.parentsFailed = 0;
    this.summaryFiles = 0;
    this.summaryFilesDone = 0;
    this.endedAt = null;
    this.finished = new Promise((resolve) => {
      this.resolve = resolve;
    });
  }

  child(job) {
    this.childrenDone += 1;
    this.lastChildAt.set(job.parent.id, performance.now());
  }

  parent(job, summary) {
    const now = performance.now();
    this.parentsDone += 1;
    this.summaryFiles += summary.files;
    this.summaryFilesDone += summary.done;
    this.latencyMs.push(now - (this.lastChildAt.get(job.id) ?? now));
    if (this.parentsDone + this.parentsFailed === this.batches) this.end(now);
  }

  failedParent() {
    this.parentsFailed += 1;
    if (this.parentsDone + this.parentsFailed === this.batches) this.end(performance.now());
  }

  end(now) {
    this.endedAt = now;
    this.resolve();
  }
}

function workers(opts, tally) {
  const shared = { connection: connection(opts.redisUrl), prefix: opts.prefix };
  // The children do nothing, like the `noop` handler of our side.
  const children = new Worker(CHILD_QUEUE, async () => null, {
    ...shared,
    concurrency: opts.childConcurrency,
  });
  // The parent's work is our finalization's: count its children's outcomes.
  const parents = new Worker(
    PARENT_QUEUE,
    async (job) => {
      const counts = await job.getDependenciesCount({ processed: true, failed: true });
      const done = counts.processed ?? 0;
      return { files: done + (counts.failed ?? 0), done, failed: counts.failed ?? 0 };
    },
    { ...shared, concurrency: opts.parentConcurrency },
  );
  children.on('completed', (job) => tally.child(job));
  children.on('failed', () => {
    tally.childrenFailed += 1;
  });
  parents.on('completed', (job, summary) => tally.parent(job, summary));
  parents.on('failed', () => tally.failedParent());
  for (const worker of [children, parents]) {
    worker.on('error', (err) => process.stderr.write(`bullmq worker error: ${err}\n`));
  }
  return [children, parents];
}

function flowOf(opts, batch) {
  const batchId = `bench-${String(batch).padStart(6, '0')}`;
  const jobOpts = opts.removeOnComplete ? { removeOnComplete: true } : {};
  const children = [];
  for (let f = 0; f < opts.files; f += 1) {
    const fileId = `file-${String(f).padStart(6, '0')}`;
    children.push({
      name: 'file',
      queueName: CHILD_QUEUE,
      data: { file_id: fileId, uri: `bench://${batch}/${f}` },
      opts: jobOpts,
    });
  }
  return {
    name: 'batch',
    queueName: PARENT_QUEUE,
    data: { batch_id: batchId },
    opts: { ...jobOpts, jobId: batchId },
    children,
  };
}

// Same shape as our harness: `submitters` lanes, each adding every n-th batch in turn.
async function submitAll(opts, producer) {
  const lanes = [];
  for (let lane = 0; lane < opts.submitters; lane += 1) {
    lanes.push(
      (async () => {
        for (let batch = lane; batch < opts.batches; batch += opts.submitters) {
          await producer.add(flowOf(opts, batch));
        }
      })(),
    );
  }
  await Promise.all(lanes);
}

function timeout(seconds) {
  let timer;
  const expired = new Promise((resolve) => {
    timer = setTimeout(() => resolve('timeout'), seconds * 1000);
  });
  return { expired, cancel: () => clearTimeout(timer) };
}

async function deleteKeys(admin, prefix) {
  let cursor = '0';
  let deleted = 0;
  do {
    const [next, keys] = await admin.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', DELETE_CHUNK);
    if (keys.length) deleted += await admin.unlink(...keys);
    cursor = next;
  } while (cursor !== '0');
  return deleted;
}

async function measure(opts, admin, producer, tally) {
  const pid = await redisPid(admin);
  const host0 = hostS(opts.clockTicks);
  const cpu0 = { node: cpuS(process.pid, opts.clockTicks), redis: cpuS(pid, opts.clockTicks) };
  const began = performance.now();
  const submitted = submitAll(opts, producer).then(() => performance.now() - began);
  const clock = timeout(opts.timeoutS);
  const outcome = await Promise.race([tally.finished.then(() => 'done'), clock.expired]);
  clock.cancel();
  const cpu1 = { node: cpuS(process.pid, opts.clockTicks), redis: cpuS(pid, opts.clockTicks) };
  const host = hostBusy(host0, hostS(opts.clockTicks));
  const submitMs = outcome === 'done' ? await submitted : null;
  const wallS = ((tally.endedAt ?? performance.now()) - began) / 1000;
  const spent = (name) =>
    cpu0[name] === null || cpu1[name] === null ? null : cpu1[name] - cpu0[name];
  return { outcome, submitMs, wallS, host, cpuS: { node: spent('node'), redis: spent('redis') } };
}

function figures(opts, tally, seen, deleted) {
  const files = opts.batches * opts.files;
  const latency = [...tally.latencyMs].sort((a, b) => a - b);
  const perFile = (s) => (s === null ? null : round((1e6 * s) / files, 1));
  const ok =
    seen.outcome === 'done' &&
    tally.parentsDone === opts.batches &&
    tally.parentsFailed === 0 &&
    tally.childrenDone === files &&
    tally.childrenFailed === 0 &&
    tally.summaryFilesDone === files;
  return {
    benchmark: 'bullmq-flows',
    bullmq: require('bullmq/package.json').version,
    node: process.version,
    batches: opts.batches,
    files,
    child_concurrency: opts.childConcurrency,
    parent_concurrency: opts.parentConcurrency,
    submitters: opts.submitters,
    remove_on_complete: opts.removeOnComplete,
    files_per_s: seen.wallS > 0 ? round(tally.childrenDone / seen.wallS) : null,
    wall_s: round(seen.wallS),
    submit_s: seen.submitMs === null ? null : round(seen.submitMs / 1000),
    finalize_latency_ms: {
      p50: round(percentile(latency, 0.5)),
      p99: round(percentile(latency, 0.99)),
      max: round(latency.length ? latency[latency.length - 1] : null),
      n: latency.length,
    },
    cpu_s: {
      node: round(seen.cpuS.node),
      redis: round(seen.cpuS.redis),
      host_busy_s: seen.host.busy_s,
      host_busy_pct: seen.host.busy_pct,
      host_steal_s: seen.host.steal_s,
    },
    cpu_us_per_file: { node: perFile(seen.cpuS.node), redis: perFile(seen.cpuS.redis) },
    peak_rss_mb: round(process.resourceUsage().maxRSS / 1024, 1),
    prefix: opts.prefix,
    keys_deleted: deleted,
    checks: {
      batches: opts.batches,
      parents_completed: tally.parentsDone,
      parents_failed: tally.parentsFailed,
      children_completed: tally.childrenDone,
      children_failed: tally.childrenFailed,
      summary_files_done: tally.summaryFilesDone,
      timed_out: seen.outcome === 'timeout',
      ok,
    },
  };
}

async function main() {
  const opts = options();
  const admin = new IORedis(opts.redisUrl, { maxRetriesPerRequest: 3 });
  const tally = new Tally(opts.batches);
  const [children, parents] = workers(opts, tally);
  const producer = new FlowProducer({ connection: connection(opts.redisUrl), prefix: opts.prefix });
  let result;
  try {
    // Connections made and Lua scripts loaded before the clock starts, as our
    // service is ready before its clock starts.
    await Promise.all([children.waitUntilReady(), parents.waitUntilReady()]);
    await producer.waitUntilReady();
    const seen = await measure(opts, admin, producer, tally);
    await Promise.all([children.close(seen.outcome !== 'done'), parents.close(seen.outcome !== 'done')]);
    await producer.close();
    result = figures(opts, tally, seen, await deleteKeys(admin, opts.prefix));
  } finally {
    await Promise.allSettled([children.close(true), parents.close(true), producer.close()]);
    if (!result) await deleteKeys(admin, opts.prefix).catch(() => 0);
    await admin.quit();
  }
  process.stdout.write(`${JSON.stringify(result)}\n`);
  return result.checks.ok ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`bullmq peer failed: ${err && err.stack ? err.stack : err}\n`);
    process.exit(2);
  },
);
