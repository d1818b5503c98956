// ESLint for the chat page's sources (web/chat/: scripts and style) and their Node tests
// (tests/web/js/). Run by tests/web/test_js.py as part of the test command, or `npx eslint .`.
import css from "@eslint/css";
import js from "@eslint/js";
import globals from "globals";

// The page renders model and server text as text only: nothing may parse a string as markup or
// run it as code (tests/web/test_web_render.py checks the rendered page for the same).
const TEXT_ONLY = "model and server text goes in as text (textContent, text nodes), never as markup";
const textOnlyRules = {
  "no-eval": "error",
  "no-implied-eval": "error",
  "no-new-func": "error",
  "no-script-url": "error",
  "no-restricted-properties": [
    "error",
    ...["innerHTML", "outerHTML", "insertAdjacentHTML", "createContextualFragment"].map(
      (property) => ({ property, message: TEXT_ONLY }),
    ),
    { object: "document", property: "write", message: TEXT_ONLY },
    { object: "document", property: "writeln", message: TEXT_ONLY },
  ],
  "no-restricted-globals": ["error", { name: "DOMParser", message: TEXT_ONLY }],
};

const strictness = {
  eqeqeq: "error",
  "no-var": "error",
  "prefer-const": "error",
  "no-shadow": "error",
};

export default [
  { ignores: [".venv/", "node_modules/", "runs/", "out/", "rendered/", "test-artifacts/"] },
  {
    // The page's scripts: plain scripts for the browser that also load as CommonJS under Node.
    files: ["web/chat/**/*.js"],
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: "script",
      globals: {
        ...globals.browser,
        tinycloud: "readonly", // the namespace the page's inline script declares (web/chat.html.j2)
        module: "readonly", // under Node only
        require: "readonly", // under Node only: a module's own dependencies (the page passes them)
      },
    },
    rules: { ...js.configs.recommended.rules, ...strictness, ...textOnlyRules },
  },
  {
    files: ["tests/web/js/**/*.js"],
    languageOptions: { ecmaVersion: 2022, sourceType: "commonjs", globals: globals.node },
    rules: { ...js.configs.recommended.rules, ...strictness },
  },
  {
    files: ["eslint.config.mjs"],
    languageOptions: { sourceType: "module", globals: globals.node },
    rules: js.configs.recommended.rules,
  },
  {
    files: ["web/chat/**/*.css"],
    plugins: { css },
    language: "css/css",
    rules: {
      ...css.configs.recommended.rules,
      // Where a browser lacks it the box keeps its size (Safari on iOS has no resize handle).
      "css/use-baseline": ["error", { allowProperties: ["resize"] }],
    },
  },
];
