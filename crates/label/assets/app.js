// preftune label: the page's whole script. Model text only ever goes through textContent.
'use strict';

const $ = (id) => document.getElementById(id);

async function api(path, opts = {}) {
  const r = await fetch(path, {
    credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json' },
    ...opts,
  });
  if (r.status === 401) {
    location.href = '/login';
    throw new Error('not logged in');
  }
  return r;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

let me = null;
let item = null;
let busy = false;
let rankOrder = [];

function status(msg) { $('status').textContent = msg; }

function renderPrompt(messages) {
  const box = $('prompt');
  box.replaceChildren();
  for (const m of messages) {
    const d = el('div', 'msg');
    d.append(el('span', 'role', m.role), el('span', 'text', m.content));
    box.append(d);
  }
}

function renderRank() {
  const list = $('ranklist');
  list.replaceChildren();
  item.responses.forEach((text, i) => {
    const card = el('div', 'resp');
    const pos = rankOrder.indexOf(i);
    if (pos >= 0) {
      card.classList.add('ranked');
      card.append(el('span', 'rankbadge', '#' + (pos + 1)));
    }
    card.append(el('h3', '', 'Response ' + (i + 1)), el('div', 'text', text));
    card.addEventListener('click', () => pick(i));
    list.append(card);
  });
  $('rankorder').textContent = rankOrder.map((i) => i + 1).join(' > ') || '(none)';
}

function render(next) {
  item = next.done ? null : next.item;
  $('done').classList.toggle('hidden', !next.done);
  $('work').classList.toggle('hidden', !!next.done);
  if (!item) return;
  renderPrompt(item.prompt);
  const pair = item.mode === 'pair';
  const thumbs = item.mode === 'thumbs';
  $('pairview').classList.toggle('hidden', !pair);
  $('thumbsview').classList.toggle('hidden', !thumbs);
  $('rankview').classList.toggle('hidden', pair || thumbs);
  if (pair) {
    $('left').textContent = item.responses[0];
    $('right').textContent = item.responses[1];
  } else if (thumbs) {
    $('single').textContent = item.responses[0];
  } else {
    rankOrder = [];
    renderRank();
  }
  $('unsafe').checked = false;
  $('comment').value = '';
  status('');
}

async function refreshMe() {
  me = await (await api('/api/me')).json();
  $('who').textContent = me.name;
  $('progress').textContent = me.labelled + ' labelled';
  $('adminlink').classList.toggle('hidden', !me.is_admin);
}

async function loadNext() {
  const r = await api('/api/next');
  render(await r.json());
}

async function submit(body) {
  if (busy || !item) return;
  busy = true;
  status('Saving...');
  try {
    const r = await api('/api/items/' + item.item_id + '/label', {
      method: 'POST',
      body: JSON.stringify({ ...body, unsafe: $('unsafe').checked, comment: $('comment').value }),
    });
    if (r.ok || r.status === 409) {
      // Saved (or saved before): only now move on.
      await refreshMe();
      await loadNext();
    } else {
      const j = await r.json().catch(() => ({}));
      status('Not saved: ' + (j.error || r.status));
    }
  } catch (e) {
    status('Not saved (' + e.message + '); try again');
  } finally {
    busy = false;
  }
}

function pick(i) {
  if (rankOrder.includes(i)) return;
  rankOrder.push(i);
  renderRank();
}

function setupLabel() {
  const scale = $('scale');
  me.scale.forEach((s, i) => {
    const b = el('button');
    b.type = 'button';
    b.append(el('kbd', '', String(i + 1)), document.createTextNode(' ' + s.text));
    b.addEventListener('click', () => submit({ scale: s.scale }));
    scale.append(b);
  });
  $('thumbup').addEventListener('click', () => submit({ up: true }));
  $('thumbdown').addEventListener('click', () => submit({ up: false }));
  document.addEventListener('keydown', (e) => {
    if (e.target === $('comment')) {
      if (e.key === 'Escape') $('comment').blur();
      return;
    }
    if (!item || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === 'u') { $('unsafe').checked = !$('unsafe').checked; return; }
    if (e.key === 'c') { e.preventDefault(); $('comment').focus(); return; }
    const n = parseInt(e.key, 10);
    if (item.mode === 'pair') {
      if (n >= 1 && n <= 7) submit({ scale: me.scale[n - 1].scale });
    } else if (item.mode === 'thumbs') {
      if (n === 1 || n === 2) submit({ up: n === 1 });
    } else {
      if (n >= 1 && n <= item.responses.length) pick(n - 1);
      else if (e.key === 'Backspace') { rankOrder.pop(); renderRank(); }
      else if (e.key === 'Enter' && rankOrder.length === item.responses.length) submit({ ranking: rankOrder });
    }
  });
}

async function setupAdmin() {
  const p = await (await api('/api/admin/progress')).json();
  $('totals').textContent = p.labelled + ' of ' + p.wanted + ' judgements done on ' + p.items +
    ' items (' + p.overlapping_items + ' overlapping), mode ' + p.mode;
  const rows = $('rows');
  for (const a of p.annotators) {
    const tr = el('tr');
    tr.append(el('td', '', a.name), el('td', '', a.is_admin ? 'yes' : ''),
      el('td', '', String(a.assigned)), el('td', '', String(a.labelled)));
    rows.append(tr);
  }
  const s = await (await api('/api/admin/stats')).json();
  $('stats').textContent = JSON.stringify(s, null, 2);
}

(async () => {
  if (document.body.dataset.page === 'admin') {
    await setupAdmin();
  } else {
    await refreshMe();
    setupLabel();
    await loadNext();
  }
})();
