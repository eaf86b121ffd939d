/*
 * PathoTune slide viewer: OpenSeadragon for the slide, one canvas above it for what a model says about it.
 *
 * Data arrive as scripts (data/catalog.js, data/slides/<id>.js) that call PathotuneViewer.catalog(...) and
 * PathotuneViewer.slide(...), so the same page works from the server and from an exported folder opened over
 * file://. Every overlay is in level-0 pixels of the slide; `toScreen` is the one mapping to the screen.
 */
(function () {
  "use strict";

  const PV = (window.PathotuneViewer = {});
  const state = {
    catalog: null,
    colormaps: {},
    viewer: null,
    slide: null, // the catalog entry shown
    data: {}, // slide id -> its overlay data, once loaded
    pending: {}, // slide id -> resolve function of its data script
    layer: null, // the score layer shown
    cmap: null,
    opacity: 0.5,
    showHeatmap: true,
    showGrid: false,
    regionsShown: {},
    heat: null, // the coloured score grid (a canvas)
    buckets: null, // cell key -> tile indices, for finding the tile under the pointer
    hover: -1,
    selected: -1,
    drawn: 0, // overlay frames drawn for the open slide
    errors: [],
  };
  PV.state = state;

  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;

  window.addEventListener("error", (e) => {
    state.errors.push(String(e.message || e));
  });

  function message(text) {
    const m = $("message");
    m.textContent = text || "";
    m.hidden = !text;
  }

  function loadScript(url) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = url;
      s.onload = () => resolve();
      s.onerror = () => reject(new Error("cannot load " + url));
      document.head.appendChild(s);
    });
  }

  function decodeBase64(text) {
    const raw = atob(text);
    const out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toPrecision(3);
  }

  // -- entry points called by the data scripts ------------------------------------------------------------
  PV.catalog = function (catalog) {
    state.catalog = catalog;
    for (const [name, table] of Object.entries(catalog.colormaps)) state.colormaps[name] = decodeBase64(table);
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
    else start();
  };

  PV.slide = function (data) {
    state.data[data.id] = data;
    const resolve = state.pending[data.id];
    delete state.pending[data.id];
    if (resolve) resolve(data);
  };

  function slideData(id) {
    if (state.data[id]) return Promise.resolve(state.data[id]);
    const waiting = new Promise((resolve) => (state.pending[id] = resolve));
    return loadScript("data/slides/" + enc(id) + ".js").then(() => waiting);
  }

  // -- start -----------------------------------------------------------------------------------------------
  function start() {
    const cat = state.catalog;
    document.title = cat.title;
    $("title").textContent = cat.title;
    $("version").textContent = "pathotune " + cat.version;
    $("slide-count").textContent = "(" + cat.slides.length + ")";
    const list = $("slide-list");
    for (const s of cat.slides) {
      const li = document.createElement("li");
      li.dataset.id = s.id;
      li.textContent = s.name;
      if (s.tiles) {
        const c = document.createElement("span");
        c.className = "count";
        c.textContent = s.tiles + " tiles";
        li.appendChild(c);
      }
      li.addEventListener("click", () => openSlide(s.id));
      list.appendChild(li);
    }
    const cmaps = $("cmap-select");
    for (const name of Object.keys(state.colormaps)) cmaps.add(new Option(name, name));

    const viewer = (state.viewer = OpenSeadragon({
      id: "osd",
      prefixUrl: "static/openseadragon/images/",
      drawer: "canvas",
      showNavigator: true,
      navigatorPosition: "TOP_RIGHT",
      maxZoomPixelRatio: 2,
      visibilityRatio: 0.5,
      gestureSettingsMouse: { clickToZoom: false },
      timeout: 60000,
    }));
    const overlay = document.createElement("canvas");
    overlay.id = "overlay";
    overlay.style.cssText = "position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none";
    viewer.canvas.appendChild(overlay);
    state.overlay = overlay;
    viewer.addHandler("update-viewport", paint); // in OpenSeadragon's own frame, so overlay and slide move together
    viewer.addHandler("resize", draw);
    viewer.addHandler("open", draw);
    viewer.addHandler("open-failed", (e) => message("cannot open the slide: " + (e.message || "")));
    viewer.addHandler("canvas-click", (e) => {
      if (e.quick) select(tileAt(e.position));
    });
    new OpenSeadragon.MouseTracker({
      element: viewer.canvas,
      moveHandler: (e) => hover(e.position),
      leaveHandler: () => hover(null),
    });

    $("layer-select").addEventListener("change", (e) => setLayer(e.target.value));
    $("cmap-select").addEventListener("change", (e) => setColormap(e.target.value));
    $("opacity").addEventListener("input", (e) => setOpacity(Number(e.target.value) / 100));
    $("show-heatmap").addEventListener("change", (e) => {
      state.showHeatmap = e.target.checked;
      updateLegend();
      draw();
    });
    $("show-grid").addEventListener("change", (e) => {
      state.showGrid = e.target.checked;
      draw();
    });
    window.addEventListener("hashchange", () => {
      const id = idFromHash();
      if (id && (!state.slide || id !== state.slide.id)) openSlide(id);
    });
    const first = idFromHash();
    openSlide(first && cat.slides.some((s) => s.id === first) ? first : cat.slides[0].id);
  }

  function idFromHash() {
    const m = /(?:^#|&)slide=([^&]*)/.exec(location.hash);
    return m ? decodeURIComponent(m[1]) : null;
  }

  // -- one slide -------------------------------------------------------------------------------------------
  function openSlide(id) {
    const s = state.catalog.slides.find((x) => x.id === id);
    if (!s) return message("no slide " + id);
    message("");
    state.slide = s;
    state.layer = null;
    state.heat = null;
    state.buckets = null;
    state.hover = state.selected = -1;
    state.drawn = 0;
    // viewport units per level-0 pixel: the shown pyramid may be cut below full size (an export's max level)
    state.sx = 1 / s.width;
    state.sy = s.dzi.height / s.height / s.dzi.width;
    for (const li of $("slide-list").children) li.classList.toggle("current", li.dataset.id === id);
    if (idFromHash() !== id) history.replaceState(null, "", "#slide=" + enc(id));
    $("slide-name").textContent = s.name;
    const mpp = s.mpp ? s.mpp.toPrecision(3) + " µm/px" : "no mpp";
    $("slide-meta").textContent = s.width + " × " + s.height + " px, " + mpp + ", " + s.backend;
    $("slide-prediction").textContent = s.prediction ? predictionText(s.prediction) : "";
    $("tile-section").hidden = true;
    state.viewer.open({
      Image: {
        xmlns: "http://schemas.microsoft.com/deepzoom/2008",
        Url: "slides/" + enc(id) + "_files/",
        Format: s.dzi.format,
        Overlap: String(s.dzi.overlap),
        TileSize: String(s.dzi.tileSize),
        Size: { Width: String(s.dzi.width), Height: String(s.dzi.height) },
      },
    });
    slideData(id)
      .then((data) => {
        if (state.slide === s) showOverlays(data);
      })
      .catch((err) => message(String(err.message || err)));
  }

  function predictionText(p) {
    const probs = Object.entries(p.probs || {})
      .map(([c, v]) => c + " " + v.toFixed(3))
      .join(", ");
    return "Slide prediction: " + p.label + (probs ? " (" + probs + ")" : "");
  }

  function showOverlays(data) {
    state.dataShown = data;
    $("slide-source").textContent = data.source ? "scores: " + data.source : "";
    const hasLayers = data.layers.length > 0;
    $("heatmap-controls").hidden = !hasLayers;
    const sel = $("layer-select");
    sel.innerHTML = "";
    for (const layer of data.layers) sel.add(new Option(layer.label, layer.name));
    if (data.tiles) buildBuckets(data.tiles);
    const regions = $("region-controls");
    regions.innerHTML = "";
    for (const r of data.regions) {
      if (!(r.name in state.regionsShown)) state.regionsShown[r.name] = true;
      const label = document.createElement("label");
      label.className = "row";
      const box = document.createElement("input");
      box.type = "checkbox";
      box.id = "show-region-" + r.name;
      box.checked = state.regionsShown[r.name];
      box.addEventListener("change", () => {
        state.regionsShown[r.name] = box.checked;
        draw();
      });
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = "rgb(" + r.colour.join(",") + ")";
      label.append(box, swatch, " " + r.name[0].toUpperCase() + r.name.slice(1) + " (" + r.polygons.length + ")");
      regions.appendChild(label);
    }
    $("no-overlays").hidden = hasLayers || data.regions.length > 0;
    if (hasLayers) setLayer(data.layers[0].name);
    else updateLegend();
    draw();
  }

  function setLayer(name) {
    const data = state.dataShown;
    const layer = data && data.layers.find((l) => l.name === name);
    if (!layer) return;
    state.layer = layer;
    $("layer-select").value = name;
    setColormap(layer.cmap in state.colormaps ? layer.cmap : Object.keys(state.colormaps)[0]);
  }

  function setColormap(name) {
    state.cmap = name;
    $("cmap-select").value = name;
    state.heat = state.layer ? colourGrid(state.layer.grid, state.colormaps[name]) : null;
    updateLegend();
    draw();
  }

  function setOpacity(alpha) {
    state.opacity = alpha;
    $("opacity").value = String(Math.round(alpha * 100));
    $("opacity-value").textContent = Math.round(alpha * 100) + "%";
    draw();
  }

  function colourGrid(grid, lut) {
    const levels = decodeBase64(grid.levels);
    const canvas = document.createElement("canvas");
    canvas.width = grid.cols;
    canvas.height = grid.rows;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(grid.cols, grid.rows);
    for (let i = 0; i < levels.length; i++) {
      const q = levels[i];
      if (q === 255) continue; // no tile: transparent
      const k = Math.round((q * 255) / 254) * 3;
      img.data[4 * i] = lut[k];
      img.data[4 * i + 1] = lut[k + 1];
      img.data[4 * i + 2] = lut[k + 2];
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return canvas;
  }

  function updateLegend() {
    const layer = state.layer;
    const shown = Boolean(layer && state.showHeatmap);
    $("legend").hidden = !shown;
    if (!shown) return;
    const lut = state.colormaps[state.cmap];
    const ctx = $("legend-ramp").getContext("2d");
    const img = ctx.createImageData(256, 1);
    for (let i = 0; i < 256; i++) {
      img.data.set([lut[3 * i], lut[3 * i + 1], lut[3 * i + 2], 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
    $("legend-label").textContent = layer.label;
    $("legend-min").textContent = fmt(layer.vmin);
    $("legend-max").textContent = fmt(layer.vmax);
  }

  // -- tiles under the pointer -----------------------------------------------------------------------------
  function buildBuckets(tiles) {
    const side = tiles.side;
    const buckets = new Map();
    const xy = tiles.xy;
    for (let i = 0; i < xy.length / 2; i++) {
      const c0 = Math.floor(xy[2 * i] / side), r0 = Math.floor(xy[2 * i + 1] / side);
      for (let r = r0; r <= r0 + 1; r++) {
        for (let c = c0; c <= c0 + 1; c++) {
          const key = c + "," + r;
          if (!buckets.has(key)) buckets.set(key, []);
          buckets.get(key).push(i);
        }
      }
    }
    state.buckets = buckets;
  }

  function toLevel0(pixel) {
    const p = state.viewer.viewport.pointFromPixel(pixel, true);
    return { x: p.x / state.sx, y: p.y / state.sy };
  }

  function tileAt(pixel) {
    const data = state.dataShown;
    if (!pixel || !data || !data.tiles || !state.buckets) return -1;
    const { x, y } = toLevel0(pixel);
    const side = data.tiles.side, xy = data.tiles.xy;
    const found = state.buckets.get(Math.floor(x / side) + "," + Math.floor(y / side)) || [];
    let best = -1, bestDist = Infinity;
    for (const i of found) {
      const tx = xy[2 * i], ty = xy[2 * i + 1];
      if (x >= tx && x < tx + side && y >= ty && y < ty + side) {
        const d = Math.hypot(x - tx - side / 2, y - ty - side / 2);
        if (d < bestDist) (best = i), (bestDist = d);
      }
    }
    return best;
  }

  function tileRows(i) {
    const data = state.dataShown, t = data.tiles;
    const rows = [["tile", String(i)], ["level-0 x, y", t.xy[2 * i] + ", " + t.xy[2 * i + 1]]];
    if (t.top && t.top[i] >= 0) rows.push(["predicted", t.classes[t.top[i]]]);
    for (const layer of data.layers) rows.push([layer.label, fmt(layer.values[i])]);
    return rows;
  }

  function hover(pixel) {
    const box = $("hover-info");
    const i = tileAt(pixel);
    if (i !== state.hover) {
      state.hover = i;
      draw();
    }
    if (i < 0) {
      box.hidden = true;
      return;
    }
    const rows = tileRows(i);
    box.textContent = rows
      .slice(2)
      .map((r) => r[0] + ": " + r[1])
      .join("  ·  ");
    box.hidden = box.textContent === "";
    box.style.left = pixel.x + 14 + "px";
    box.style.top = pixel.y + 14 + "px";
  }

  function select(i) {
    state.selected = i;
    $("tile-section").hidden = i < 0;
    const info = $("tile-info");
    info.innerHTML = "";
    if (i >= 0) {
      const table = document.createElement("table");
      for (const [k, v] of tileRows(i)) {
        const tr = table.insertRow();
        tr.insertCell().textContent = k;
        const td = tr.insertCell();
        td.textContent = v;
        td.className = "num";
      }
      info.appendChild(table);
    }
    draw();
  }

  // -- drawing ---------------------------------------------------------------------------------------------
  let queued = false;
  function draw() {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      paint();
    });
  }

  function paint() {
    const viewer = state.viewer, canvas = state.overlay;
    const dpr = window.devicePixelRatio || 1;
    const w = viewer.canvas.clientWidth, h = viewer.canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    updateScalebar();
    const data = state.dataShown;
    if (!data || !state.slide || data.id !== state.slide.id || viewer.world.getItemCount() === 0) return;
    const vp = viewer.viewport;
    const o = vp.pixelFromPoint(new OpenSeadragon.Point(0, 0), true);
    const e = vp.pixelFromPoint(new OpenSeadragon.Point(1, 0), true);
    const k = e.x - o.x; // screen pixels per viewport unit
    const ax = dpr * k * state.sx, ay = dpr * k * state.sy; // device pixels per level-0 pixel
    ctx.setTransform(ax, 0, 0, ay, dpr * o.x, dpr * o.y);
    const onePixel = 1 / ax;

    if (state.heat && state.showHeatmap && state.layer) {
      const g = state.layer.grid;
      ctx.globalAlpha = state.opacity;
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(state.heat, g.x, g.y, g.cols * g.step, g.rows * g.step);
      ctx.globalAlpha = 1;
    }
    for (const r of data.regions) {
      if (!state.regionsShown[r.name]) continue;
      ctx.beginPath();
      for (const polygon of r.polygons) {
        for (const ring of polygon) {
          ctx.moveTo(ring[0], ring[1]);
          for (let j = 2; j < ring.length; j += 2) ctx.lineTo(ring[j], ring[j + 1]);
          ctx.closePath();
        }
      }
      const rgb = r.colour.join(",");
      ctx.fillStyle = "rgba(" + rgb + ",0.12)";
      ctx.fill("evenodd");
      ctx.strokeStyle = "rgb(" + rgb + ")";
      ctx.lineWidth = 2 * dpr * onePixel;
      ctx.stroke();
    }
    const t = data.tiles;
    if (t) {
      const side = t.side, xy = t.xy;
      if (state.showGrid && side * ax >= 4) {
        const b = vp.getBounds(true);
        const x0 = b.x / state.sx - side, x1 = (b.x + b.width) / state.sx;
        const y0 = b.y / state.sy - side, y1 = (b.y + b.height) / state.sy;
        ctx.beginPath();
        for (let i = 0; i < xy.length / 2; i++) {
          const x = xy[2 * i], y = xy[2 * i + 1];
          if (x >= x0 && x <= x1 && y >= y0 && y <= y1) ctx.rect(x, y, side, side);
        }
        ctx.strokeStyle = "rgba(0,0,0,0.55)";
        ctx.lineWidth = onePixel * dpr;
        ctx.stroke();
      }
      for (const [i, colour, width] of [
        [state.hover, "rgba(255,255,255,0.95)", 2],
        [state.selected, "rgb(0,200,255)", 3],
      ]) {
        if (i < 0) continue;
        ctx.strokeStyle = colour;
        ctx.lineWidth = width * dpr * onePixel;
        ctx.strokeRect(xy[2 * i], xy[2 * i + 1], side, side);
      }
    }
    state.drawn += 1;
  }

  function updateScalebar() {
    const s = state.slide, bar = $("scalebar");
    if (!s || !s.mpp || state.viewer.world.getItemCount() === 0) {
      bar.hidden = true;
      return;
    }
    const vp = state.viewer.viewport;
    const o = vp.pixelFromPoint(new OpenSeadragon.Point(0, 0), true);
    const e = vp.pixelFromPoint(new OpenSeadragon.Point(1, 0), true);
    const umPerPixel = s.mpp / ((e.x - o.x) * state.sx); // µm per screen pixel
    let length = 1e-3;
    for (const m of [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 1e4, 2e4, 5e4, 1e5]) {
      if (m / umPerPixel <= 160) length = m;
    }
    bar.hidden = false;
    $("scalebar-bar").style.width = length / umPerPixel + "px";
    $("scalebar-label").textContent = length >= 1000 ? length / 1000 + " mm" : length + " µm";
  }

  // -- for scripts and tests -------------------------------------------------------------------------------
  PV.openSlide = openSlide;
  PV.setLayer = setLayer;
  PV.setColormap = setColormap;
  PV.setOpacity = setOpacity;
  /** Level-0 pixel (x, y) -> position in the page (CSS pixels), e.g. to check what is drawn where. */
  PV.toPage = function (x, y) {
    const p = state.viewer.viewport.pixelFromPoint(new OpenSeadragon.Point(x * state.sx, y * state.sy), true);
    const r = state.viewer.canvas.getBoundingClientRect();
    return { x: r.left + p.x, y: r.top + p.y };
  };
  /** True once the open slide's tiles are all drawn and its overlays painted. */
  PV.ready = function () {
    const viewer = state.viewer;
    const item = viewer && viewer.world.getItemCount() > 0 ? viewer.world.getItemAt(0) : null;
    return Boolean(
      item && item.getFullyLoaded() && state.dataShown && state.slide && state.dataShown.id === state.slide.id &&
        state.drawn > 0 && !queued
    );
  };
})();
