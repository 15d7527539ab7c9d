# Monolithic Application
from flask import Flask, jsonify

app_monolith = Flask(__name__)

@app_monolith.route('/api/<user_id>/<product_id>')
def get_user_and_product_monolith(user_id, product_id):
    # Simulate fetching user data from a monolithic database
    user_data = {
        'user_id': user_id,
        'username': f'user_{user_id}',
        'email': f'user_{user_id}@example.com'
    }

    # Simulate fetching product data from a monolithic database
    product_data = {
        'product_id': product_id,
        'name': f'Product_{product_id}',
        'price': 19.99
    }

    # Combine user and product data
    result = {
        'user': user_data,
        'product': product_data
    }

    return jsonify(result)

if __name__ == '__main__':
    app_monolith.run(port=5000)
