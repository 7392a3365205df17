// The API documentation of geoswc serve, drawn from the server's own /openapi.json: no file from another
// host is loaded. Every string from the schema is inserted as text.
(function () {
  'use strict';

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function typeOf(schema) {
    if (!schema) return '';
    if (schema.type === 'array') return `array of ${typeOf(schema.items)}`;
    if (schema.enum) return `${schema.type || ''} (${schema.enum.join(', ')})`;
    if (schema.anyOf) return schema.anyOf.map(typeOf).join(' | ');
    const range = schema.minimum !== undefined || schema.maximum !== undefined
      ? ` ${schema.minimum ?? ''}–${schema.maximum ?? ''}` : '';
    return `${schema.format || schema.type || ''}${range}`;
  }

  function table(header, rows) {
    const t = el('table', {}, el('tr', {}, ...header.map((h) => el('th', { text: h }))));
    for (const row of rows) t.append(el('tr', {}, ...row.map((c) => el('td', { text: String(c ?? '') }))));
    return t;
  }

  function endpoint(path, method, op) {
    const section = el('section', { class: 'endpoint', id: `${method}-${path}` },
      el('h2', {}, el('span', { class: `method ${method}`, text: method.toUpperCase() }), ' ',
        el('span', { class: 'path', text: path })),
      op.summary ? el('p', { text: op.summary }) : null,
      op.description ? el('p', { class: 'muted', text: op.description }) : null);
    const params = op.parameters || [];
    if (params.length) {
      section.append(el('h3', { text: 'Parameters' }), table(['name', 'in', 'required', 'type', 'description'],
        params.map((p) => [p.name, p.in, p.required ? 'yes' : 'no', typeOf(p.schema), p.description || (p.schema || {}).description])));
    }
    const content = (op.requestBody || {}).content || {};
    for (const [mediaType, body] of Object.entries(content)) {
      const schema = body.schema || {};
      const required = new Set(schema.required || []);
      section.append(el('h3', { text: `Request body (${mediaType})` }), table(['field', 'required', 'type', 'default', 'description'],
        Object.entries(schema.properties || {}).map(([name, s]) => [name, required.has(name) ? 'yes' : 'no', typeOf(s), s.default, s.description])));
    }
    section.append(el('h3', { text: 'Responses' }), table(['status', 'description'],
      Object.entries(op.responses || {}).map(([code, r]) => [code, r.description])));
    return section;
  }

  fetch('/openapi.json')
    .then((r) => r.json())
    .then((spec) => {
      const main = document.getElementById('docs');
      main.replaceChildren();
      document.getElementById('title').textContent = `${spec.info.title} ${spec.info.version} API`;
      main.append(el('p', { text: spec.info.description || '' }));
      for (const [path, methods] of Object.entries(spec.paths || {})) {
        for (const [method, op] of Object.entries(methods)) main.append(endpoint(path, method, op));
      }
      main.setAttribute('aria-busy', 'false');
    })
    .catch((err) => { document.getElementById('docs').textContent = `cannot read /openapi.json: ${err}`; });
})();
