# Api Gateway
# The seed's listing uses Flask and jsonify without importing them; this one line is the
# only addition, without it the module does not load.
from flask import Flask, jsonify
import requests

app_gateway = Flask(__name__)

USER_SERVICE_URL = 'http://localhost:5001/user/'
PRODUCT_SERVICE_URL = 'http://localhost:5002/product/'

@app_gateway.route('/api/<user_id>/<product_id>')
def get_user_and_product(user_id, product_id):
    user_response = requests.get(f'{USER_SERVICE_URL}{user_id}')
    user_data = user_response.json()

    product_response = requests.get(f'{PRODUCT_SERVICE_URL}{product_id}')
    product_data = product_response.json()

    result = {
        'user': user_data,
        'product': product_data
    }

    return jsonify(result)

if __name__ == '__main__':
    app_gateway.run(port=5000)
