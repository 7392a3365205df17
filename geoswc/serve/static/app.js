// The geoswc page: upload photos, see where they were placed and why; review a tag run on the map.
// Everything it needs ships with the package (Leaflet, topojson-client, the Natural Earth basemap), so it
// works with no network; online tiles are offered only when they load.
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const state = {
    model: null, files: [], urls: [], results: [], selected: -1, area: null,
    tagRows: [], tagSel: -1, tagSource: null, running: 0,
  };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v);
    }
    return append(node, ...children);
  }
  // node.append prints null as the word "null": absent parts are left out instead.
  function append(node, ...children) {
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }
  // Text for a Leaflet tooltip or popup: Leaflet inserts a string as HTML, an element as it is.
  const textNode = (text) => el('span', { text: String(text) });
  // A row with a position to show: placed (ok), or an abstention with its best guess.
  const placed = (r) => r.status === 'ok' || r.status === 'abstain';
  const position = (r) => (r.status === 'abstain' ? [r.guess_lat, r.guess_lon] : [r.lat, r.lon]);
  const fmt = (x, digits) => (x === null || x === undefined || Number.isNaN(x) ? '–' : Number(x).toFixed(digits));

  // ------------------------------------------------------------------------------------------- the map
  // No fade-in: a popup caught mid-fade (or a screenshot of it) is drawn faint.
  const map = L.map('map', { fadeAnimation: false, worldCopyJump: true, minZoom: 1, maxZoom: 18, zoomSnap: 0.5 }).setView([20, 0], 2);
  window.geoswcMap = map; // for scripted checks (tests/test_serve_browser.py) and the console
  const offline = L.layerGroup().addTo(map);
  const resultLayer = L.featureGroup().addTo(map);
  const areaLayer = L.featureGroup().addTo(map);
  const tagLayer = L.markerClusterGroup ? L.markerClusterGroup({ maxClusterRadius: 50 }) : L.featureGroup();

  // Longitudes of a ring unwrapped so no step exceeds 180 degrees (Natural Earth rings that cross the
  // antimeridian jump from 180 to -180); a ring around a pole (Antarctica) is closed along the pole.
  function unwrapRing(ring) {
    const out = [[ring[0][0], ring[0][1]]];
    for (let i = 1; i < ring.length; i++) {
      let d = ring[i][0] - ring[i - 1][0];
      d = ((((d + 180) % 360) + 360) % 360) - 180;
      out.push([out[i - 1][0] + d, ring[i][1]]);
    }
    if (Math.abs(out[out.length - 1][0] - out[0][0]) > 180) {
      const meanLat = out.reduce((s, p) => s + p[1], 0) / out.length;
      const pole = meanLat < 0 ? -90 : 90;
      out.push([out[out.length - 1][0], pole], [out[0][0], pole], out[0]);
    }
    let lo = Infinity, hi = -Infinity;
    for (const p of out) { lo = Math.min(lo, p[0]); hi = Math.max(hi, p[0]); }
    const shift = -360 * Math.round((lo + hi) / 720);
    return shift ? out.map((p) => [p[0] + shift, p[1]]) : out;
  }

  function landPolygons(geometry) {
    const polygons = geometry.type === 'Polygon' ? [geometry.coordinates] : geometry.coordinates;
    const out = [];
    for (const polygon of polygons) {
      const rings = polygon.map(unwrapRing);
      out.push(rings);
      const lons = rings.flat().map((p) => p[0]);
      if (Math.max(...lons) > 180) out.push(rings.map((r) => r.map((p) => [p[0] - 360, p[1]])));
      if (Math.min(...lons) < -180) out.push(rings.map((r) => r.map((p) => [p[0] + 360, p[1]])));
    }
    return { type: 'MultiPolygon', coordinates: out };
  }

  function splitLines(geometry) {
    const lines = geometry.type === 'LineString' ? [geometry.coordinates] : geometry.coordinates;
    const out = [];
    for (const line of lines) {
      let piece = [line[0]];
      for (let i = 1; i < line.length; i++) {
        if (Math.abs(line[i][0] - line[i - 1][0]) > 180) {
          if (piece.length > 1) out.push(piece);
          piece = [];
        }
        piece.push(line[i]);
      }
      if (piece.length > 1) out.push(piece);
    }
    return { type: 'MultiLineString', coordinates: out };
  }

  fetch('/basemap/countries-50m.json')
    .then((r) => r.json())
    .then((topo) => {
      const land = topojson.feature(topo, topo.objects.land);
      const geometries = (land.features || [land]).map((f) => landPolygons(f.geometry));
      const borders = splitLines(topojson.mesh(topo, topo.objects.countries, (a, b) => a !== b));
      const style = { color: '#8a8a8a', weight: 0.7, fillColor: '#e8e4d8', fillOpacity: 1 };
      for (const g of geometries) L.geoJSON(g, { style, interactive: false }).addTo(offline);
      L.geoJSON(borders, { style: { color: '#999', weight: 0.6, fill: false }, interactive: false }).addTo(offline);
      $('map').dataset.basemap = 'ready';
    })
    .catch((err) => { $('map').dataset.basemap = 'failed'; console.error('basemap', err); });

  function offerOnlineTiles(url, attribution) {
    // Offered only when a tile actually loads: offline, the page keeps the shipped basemap.
    const probe = new Image();
    const timer = setTimeout(() => { probe.src = ''; }, 4000);
    probe.onload = () => {
      clearTimeout(timer);
      const tiles = L.tileLayer(url, { attribution, maxZoom: 19 });
      L.control.layers({ 'Natural Earth (offline)': offline, 'Online tiles': tiles }, {}, { collapsed: false }).addTo(map);
    };
    probe.onerror = () => clearTimeout(timer);
    probe.src = url.replace('{s}', 'a').replace('{z}', '0').replace('{x}', '0').replace('{y}', '0');
  }

  // ------------------------------------------------------------------------------------------- the model
  fetch('/v1/model')
    .then((r) => r.json())
    .then((m) => {
      state.model = m;
      $('model-info').textContent = `${m.backbone} · heads ${m.heads.join(', ') || 'none'} · ` +
        `${m.background_size} background photos · cells ${m.fingerprint}`;
      for (const h of m.heads) $('head').append(el('option', { value: h, text: h, selected: h === m.default_head }));
      if (!m.heads.length) {
        // A street model (geoswc vpr index) has no head and no cells: no head to pick, no cells to count.
        for (const id of ['head', 'top-k']) $(id).closest('label').style.display = 'none';
      }
      const modeNames = { swc: 'Search within Cell', cell: 'cell (head only)', rrm: 'retrieval (nearest photo)' };
      for (const mode of m.modes) $('mode').append(el('option', { value: mode, text: modeNames[mode] || mode }));
      if (m.tile_url) offerOnlineTiles(m.tile_url, m.tile_attribution || '');
      if (m.tags) loadServerTags();
    });

  // ------------------------------------------------------------------------------------------- locating
  function setStatus(text, isError) {
    $('status').textContent = text;
    $('status').className = isError ? 'error' : '';
  }

  function addFiles(fileList) {
    const files = Array.from(fileList).filter((f) => f.size >= 0);
    if (!files.length) return;
    state.urls.forEach((u) => URL.revokeObjectURL(u));
    state.files = files;
    state.urls = files.map((f) => URL.createObjectURL(f));
    locateAll();
  }

  async function locateAll() {
    if (!state.files.length) return;
    const run = ++state.running;
    const limit = (state.model && state.model.limits.max_files) || 16;
    setStatus(`Locating ${state.files.length} photo${state.files.length > 1 ? 's' : ''}…`);
    const results = [];
    try {
      for (let start = 0; start < state.files.length; start += limit) {
        const form = new FormData();
        for (const f of state.files.slice(start, start + limit)) form.append('file', f, f.name);
        form.append('head', $('head').value);
        form.append('mode', $('mode').value);
        form.append('top_k', $('top-k').value);
        if (state.area) form.append('area', state.area.map((v) => v.toFixed(4)).join(','));
        if ($('min-confidence').value !== '') form.append('min_confidence', $('min-confidence').value);
        const response = await fetch('/v1/locate', { method: 'POST', body: form });
        const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
        if (!body.results) throw new Error(body.detail || `HTTP ${response.status}`);
        results.push(...body.results);
        if (!response.ok && state.files.length === 1) setStatus(body.detail, true);
      }
    } catch (err) {
      if (run === state.running) setStatus(String(err.message || err), true);
      return;
    }
    if (run !== state.running) return;
    state.results = results;
    const ok = results.filter((r) => r.status === 'ok').length;
    const abstained = results.filter((r) => r.status === 'abstain').length;
    if (ok || abstained || results.length > 1) {
      setStatus(`${ok} of ${results.length} placed` + (abstained ? `, ${abstained} below the minimum confidence` : ''));
    }
    renderResults();
    const first = results.findIndex(placed);
    select(first >= 0 ? first : 0);
  }

  function renderResults() {
    const list = $('results');
    list.replaceChildren();
    state.results.forEach((r, i) => {
      const [lat, lon] = position(r);
      const text = r.status === 'ok'
        ? `${fmt(lat, 4)}, ${fmt(lon, 4)} · ${r.method}`
        : r.status === 'abstain'
          ? `abstain (guess ${fmt(lat, 4)}, ${fmt(lon, 4)}) · ${r.method}`
          : `${r.status}: ${r.error}`;
      const item = el('li', { class: placed(r) ? (r.status === 'abstain' ? 'abstain' : '') : 'error', 'data-index': i },
        el('img', { src: state.urls[i], alt: '' }),
        el('div', {}, el('div', { text: r.path }), el('div', { class: 'muted', text })));
      item.addEventListener('click', () => select(i));
      list.append(item);
    });
  }

  const METHOD_WORDS = {
    swc: 'Search within Cell: the mean of the largest cluster of similar background photos in the best cell',
    fallback: 'the head\'s cell: no background photo in the best cell to search',
    cell: 'the head\'s best cell (or the MvMF mean)',
    rrm: 'the most similar background photo anywhere',
  };

  function select(i) {
    state.selected = i;
    document.querySelectorAll('#results li').forEach((li) => li.classList.toggle('selected', Number(li.dataset.index) === i));
    resultLayer.clearLayers();
    const detail = $('detail');
    detail.replaceChildren();
    const r = state.results[i];
    if (!r) return;
    detail.append(el('img', { class: 'photo', src: state.urls[i], alt: r.path }));
    if (!placed(r)) {
      detail.append(el('p', { class: 'error', text: `${r.path}: ${r.error}` }));
      return;
    }
    const [lat, lon] = position(r);
    const abstained = r.status === 'abstain';
    const cells = r.cells || [];
    const pmax = Math.max(1e-9, ...cells.map((c) => c.probability || 0));
    cells.forEach((c, rank) => {
      const share = (c.probability || 0) / pmax;
      L.polygon(c.polygon, {
        className: 'cell-polygon', color: '#2b6cb0', weight: rank === 0 ? 2 : 1,
        fillColor: '#2b6cb0', fillOpacity: 0.05 + 0.35 * share,
      }).bindTooltip(textNode(`cell ${c.token}: p = ${fmt(c.probability, 3)}`)).addTo(resultLayer);
    });
    (r.neighbours || []).forEach((n) => {
      L.circleMarker([n.lat, n.lon], {
        className: n.in_cluster ? 'neighbour-marker in-cluster' : 'neighbour-marker',
        radius: n.in_cluster ? 6 : 4, color: n.in_cluster ? '#c62828' : '#555', weight: 1,
        fillOpacity: 0.8,
      }).bindTooltip(textNode(`${n.id} · similarity ${fmt(n.similarity, 3)}${n.in_cluster ? ' · in the winning cluster' : ''}`))
        .addTo(resultLayer);
    });
    const hasExif = r.exif_lat !== null && r.exif_lat !== undefined;
    if (hasExif) {
      L.marker([r.exif_lat, r.exif_lon], {
        icon: L.divIcon({ className: 'exif-marker', html: '<div class="pin"></div>', iconSize: [14, 14], iconAnchor: [7, 7] }),
        title: `${r.path}: EXIF GPS ${fmt(r.exif_lat, 4)}, ${fmt(r.exif_lon, 4)}`, zIndexOffset: 900,
      }).addTo(resultLayer);
    }
    L.marker([lat, lon], {
      icon: L.divIcon({ className: abstained ? 'pred-marker abstain' : 'pred-marker', html: '<div class="pin"></div>', iconSize: [18, 18], iconAnchor: [9, 9] }),
      title: `${r.path}: ${abstained ? 'guess ' : ''}${fmt(lat, 4)}, ${fmt(lon, 4)}`, zIndexOffset: 1000,
    }).addTo(resultLayer);
    const bounds = resultLayer.getBounds();
    if (bounds.isValid()) map.fitBounds(bounds.pad(0.3), { maxZoom: 11 });

    const words = r.confidence_words || 'unknown';
    const where = [r.place, r.country].filter((x) => x).join(', ');
    append(detail,
      el('h3', { text: r.path }),
      abstained
        ? el('p', { class: 'abstain-note' }, 'Abstained: the confidence is below the minimum; best guess below.')
        : null,
      el('p', {}, el('strong', { text: `${abstained ? 'guess ' : ''}${fmt(lat, 5)}, ${fmt(lon, 5)}` }),
        where ? el('span', { class: 'place', text: ` near ${where}` }) : null,
        el('span', { class: 'muted', text: `${r.head ? ` · head ${r.head}` : ''} · mode ${r.mode}` })),
      hasExif
        ? el('p', { class: 'exif' }, `Photo's own GPS (EXIF): ${fmt(r.exif_lat, 5)}, ${fmt(r.exif_lon, 5)}`,
          el('span', { class: 'muted', text: ` · ${fmt(r.exif_distance_km, 1)} km from the ${abstained ? 'guess' : 'prediction'}` }))
        : null,
      r.confidence === null || r.confidence === undefined
        ? null
        : el('p', {}, 'Confidence: ', el('span', { class: `confidence ${words}`, text: `${words} (${fmt(r.confidence, 2)})` }),
          el('span', { class: 'muted', text: ' probability mass within 25 km of the best cell' })),
      el('p', {}, 'Method: ', el('strong', { class: 'method', text: r.method }),
        el('span', { class: 'muted', text: ` — ${METHOD_WORDS[r.method] || ''}` })),
    );
    if (cells.length) {
      const table = el('table', { id: 'top-cells' }, el('tr', {}, el('th', { text: 'top cell' }), el('th', { text: 'probability' })));
      cells.forEach((c) => table.append(el('tr', {}, el('td', { text: c.token }), el('td', { text: fmt(c.probability, 4) }))));
      detail.append(table);
    }
    const neighbours = r.neighbours || [];
    detail.append(el('h4', { text: `Background photos searched (${neighbours.length})` }));
    const list = el('ol', { id: 'neighbours' });
    neighbours.forEach((n) => {
      list.append(el('li', { class: n.in_cluster ? 'in-cluster' : '' },
        n.thumbnail ? el('img', { src: n.thumbnail, alt: n.id, loading: 'lazy' }) : null,
        `${n.id} · sim ${fmt(n.similarity, 3)} · ${fmt(n.distance_km, 1)} km`,
        n.in_cluster ? el('span', { class: 'badge', text: 'cluster' }) : null));
    });
    if (!neighbours.length) list.append(el('li', { class: 'muted', text: 'none (this mode searches no background photo, or the cell holds none)' }));
    detail.append(list);
  }

  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => { e.preventDefault(); drop.classList.remove('over'); addFiles(e.dataTransfer.files); });
  $('file-input').addEventListener('change', (e) => addFiles(e.target.files));
  for (const id of ['head', 'mode', 'top-k', 'min-confidence']) $(id).addEventListener('change', locateAll);

  // ------------------------------------------------------------------------------------------- the area
  let drawing = false, anchor = null, rect = null;
  function setArea(area) {
    state.area = area;
    areaLayer.clearLayers();
    $('clear-area').disabled = !area;
    $('area-text').textContent = area ? `S ${fmt(area[0], 2)} W ${fmt(area[1], 2)} N ${fmt(area[2], 2)} E ${fmt(area[3], 2)}` : '';
    if (area) {
      L.rectangle([[area[0], area[1]], [area[2], area[3]]], { className: 'area-box', color: '#c62828', weight: 2, fill: false, dashArray: '6 4' }).addTo(areaLayer);
    }
  }
  $('draw-area').addEventListener('click', () => {
    drawing = !drawing;
    $('draw-area').classList.toggle('active', drawing);
    if (drawing) map.dragging.disable(); else map.dragging.enable();
  });
  $('clear-area').addEventListener('click', () => { setArea(null); locateAll(); });
  map.on('mousedown', (e) => {
    if (!drawing) return;
    anchor = e.latlng;
    rect = L.rectangle([anchor, anchor], { color: '#c62828', weight: 2, fill: false }).addTo(areaLayer);
  });
  map.on('mousemove', (e) => { if (drawing && anchor && rect) rect.setBounds([anchor, e.latlng]); });
  map.on('mouseup', (e) => {
    if (!drawing || !anchor) return;
    const b = L.latLngBounds(anchor, e.latlng);
    anchor = null; drawing = false;
    map.dragging.enable();
    $('draw-area').classList.remove('active');
    const clampLat = (v) => Math.max(-90, Math.min(90, v));
    const wrapLon = (v) => ((((v + 180) % 360) + 360) % 360) - 180;
    const west = b.getWest(), east = b.getEast();
    const area = east - west >= 360
      ? [clampLat(b.getSouth()), -180, clampLat(b.getNorth()), 180]
      : [clampLat(b.getSouth()), wrapLon(west), clampLat(b.getNorth()), wrapLon(east)];
    setArea(area);
    locateAll();
  });

  // ------------------------------------------------------------------------------------------- tag runs
  function parseCsv(text) {
    const rows = [];
    let row = [], field = '', quoted = false;
    for (let i = 0; i < text.length; i++) {
      const ch = text[i];
      if (quoted) {
        if (ch === '"' && text[i + 1] === '"') { field += '"'; i++; }
        else if (ch === '"') quoted = false;
        else field += ch;
      } else if (ch === '"') quoted = true;
      else if (ch === ',') { row.push(field); field = ''; }
      else if (ch === '\n' || ch === '\r') {
        if (ch === '\r' && text[i + 1] === '\n') i++;
        row.push(field); field = '';
        if (row.length > 1 || row[0] !== '') rows.push(row);
        row = [];
      } else field += ch;
    }
    if (field !== '' || row.length) { row.push(field); rows.push(row); }
    if (!rows.length) return [];
    const header = rows[0];
    return rows.slice(1).map((values) => Object.fromEntries(header.map((h, k) => [h, values[k] ?? ''])));
  }

  function parseTags(name, text) {
    const lower = name.toLowerCase();
    let rows;
    if (lower.endsWith('.geojson') || lower.endsWith('.json')) {
      const fc = JSON.parse(text);
      rows = (fc.features || []).map((f) => {
        const p = { ...(f.properties || {}) };
        if (f.geometry && f.geometry.type === 'Point' && (p.lat === undefined || p.lat === null)) {
          p.lon = f.geometry.coordinates[0]; p.lat = f.geometry.coordinates[1];
        }
        return p;
      });
    } else if (lower.endsWith('.jsonl')) {
      rows = text.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
    } else {
      rows = parseCsv(text);
    }
    return rows.map((r, i) => ({ index: i, ...r }));
  }

  function showTags(rows, source) {
    state.tagRows = rows;
    state.tagSource = source;
    tagLayer.clearLayers();
    const list = $('tags-list');
    list.replaceChildren();
    let placed = 0;
    rows.forEach((r, i) => {
      r._marker = null; // a row read from a file may carry any key
      const lat = parseFloat(r.lat ?? r.guess_lat), lon = parseFloat(r.lon ?? r.guess_lon);
      if (Number.isFinite(lat) && Number.isFinite(lon)) {
        placed++;
        const marker = L.marker([lat, lon], { title: String(r.path) }).bindPopup(textNode(r.path));
        marker.on('click', () => selectTag(i, false));
        r._marker = marker;
        tagLayer.addLayer(marker);
      }
      const item = el('li', { class: r.status === 'error' ? 'error' : '', 'data-index': i,
        text: `${r.path} · ${r.status}${r.status === 'ok' ? '' : r.error ? ': ' + r.error : ''}` });
      item.addEventListener('click', () => selectTag(i, true));
      list.append(item);
    });
    $('tags-summary').textContent = `${source}: ${rows.length} photos, ${placed} on the map`;
    if (!map.hasLayer(tagLayer)) tagLayer.addTo(map);
    const bounds = tagLayer.getBounds();
    if (bounds.isValid()) map.fitBounds(bounds.pad(0.2));
    if (rows.length) selectTag(0, false);
  }

  function selectTag(i, fly) {
    if (!state.tagRows.length) return;
    i = (i + state.tagRows.length) % state.tagRows.length;
    state.tagSel = i;
    const r = state.tagRows[i];
    document.querySelectorAll('#tags-list li').forEach((li) => li.classList.toggle('selected', Number(li.dataset.index) === i));
    const current = document.querySelector(`#tags-list li[data-index="${i}"]`);
    if (current) current.scrollIntoView({ block: 'nearest' });
    $('tags-pos').textContent = `${i + 1} / ${state.tagRows.length}`;
    const detail = $('tags-detail');
    detail.replaceChildren();
    if (state.tagSource === 'server') detail.append(el('img', { src: `/v1/tags/photo?i=${i}`, alt: String(r.path) }));
    detail.append(el('div', { text: String(r.path) }));
    const fields = ['status', 'error', 'lat', 'lon', 'method', 'cell_token', 'confidence', 'place', 'country'];
    const table = el('table');
    for (const f of fields) {
      if (r[f] !== undefined && r[f] !== null && r[f] !== '') table.append(el('tr', {}, el('th', { text: f }), el('td', { text: String(r[f]) })));
    }
    detail.append(table);
    if (r._marker) {
      if (fly) map.setView(r._marker.getLatLng(), Math.max(map.getZoom(), 8));
      const popup = () => r._marker.openPopup();
      if (tagLayer.zoomToShowLayer) tagLayer.zoomToShowLayer(r._marker, popup); else popup();
    }
  }

  function loadServerTags() {
    fetch('/v1/tags').then((r) => r.json()).then((body) => {
      if (body.rows) showTags(body.rows, 'server');
    });
  }

  $('tags-input').addEventListener('change', async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      showTags(parseTags(file.name, await file.text()), file.name);
    } catch (err) {
      $('tags-summary').textContent = `${file.name}: cannot read (${err.message || err})`;
    }
  });
  $('tags-prev').addEventListener('click', () => selectTag(state.tagSel - 1, true));
  $('tags-next').addEventListener('click', () => selectTag(state.tagSel + 1, true));
  document.addEventListener('keydown', (e) => {
    if ($('view-tags').hidden || e.target.tagName === 'INPUT') return;
    if (e.key === 'ArrowRight') selectTag(state.tagSel + 1, true);
    if (e.key === 'ArrowLeft') selectTag(state.tagSel - 1, true);
  });

  // ------------------------------------------------------------------------------------------- the views
  function showView(name) {
    const tags = name === 'tags';
    $('view-locate').hidden = tags;
    $('view-tags').hidden = !tags;
    $('tab-locate').classList.toggle('active', !tags);
    $('tab-tags').classList.toggle('active', tags);
    $('tab-locate').setAttribute('aria-pressed', String(!tags));
    $('tab-tags').setAttribute('aria-pressed', String(tags));
    if (tags) { map.removeLayer(resultLayer); map.removeLayer(areaLayer); tagLayer.addTo(map); }
    else { map.removeLayer(tagLayer); resultLayer.addTo(map); areaLayer.addTo(map); }
  }
  $('tab-locate').addEventListener('click', () => showView('locate'));
  $('tab-tags').addEventListener('click', () => showView('tags'));
  showView('locate');
})();
